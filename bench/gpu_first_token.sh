#!/usr/bin/env bash
# Time to first token on a GPU machine as on a fresh one: the driver's JIT cache disabled
# (CUDA_CACHE_DISABLE=1), so every PTX module is compiled at first use; then with the cache
# warm. Then the nvidia-smi-style peak of a 1b LoRA row (bench's peak_smi_mb) beside a peak
# sampled from nvidia-smi itself. Run from `.device/` beside a CUDA binary built with
# `../shared/cuda/build.sh --bin llmtool` (see docs/benchmarks.md).
cd "$(dirname "$0")"
gunzip -f llmtool.gz && chmod +x llmtool
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
F=../tests/fixtures
gen() { /usr/bin/time -f "wall %e s" ./llmtool generate --device cuda --dtype bf16 --model $F/tiny-llama --prompt "The model reads the notes" --max-tokens 16 --temperature 0 > /dev/null; }
{
for i in 1 2; do
  echo "== no JIT cache ($i)"; CUDA_CACHE_DISABLE=1 gen
done
echo "== JIT cache filled, then warm"; gen; gen
} > "$OUT/first-token.txt" 2>&1
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/smi.txt &
sampler=$!
timeout 150 ./llmtool bench --device cuda --sizes 1b --tasks lora --modes bf16+ckpt --rank 16 --lora-targets all --batch 4 --seq 2048 --steps 5 --warmup 2 --out "$OUT/lora-1b.jsonl" > "$OUT/lora-1b.txt" 2>&1
echo "rc=$?" >> "$OUT/lora-1b.txt"
kill $sampler; echo "sampled nvidia-smi peak MiB: $(sort -n /tmp/smi.txt | tail -1)" >> "$OUT/lora-1b.txt"
