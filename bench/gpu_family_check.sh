#!/usr/bin/env bash
# The fused kernels of the new families on the GPU: op checks, then each tiny family fixture's
# eval NLL and greedy text (compared with the CPU's afterwards), then a short LoRA fine-tune of
# each family in bf16. The 100 greedy tokens pass the tiny fixtures' windows (8) many times, so
# their window layers drop positions and the captured decode step is captured again after each
# drop.
cd "$(dirname "$0")"
gunzip -f llmtool.gz && chmod +x llmtool
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
./llmtool --version >> "$OUT/gpu.txt" 2>&1
./llmtool bench --ops --device cuda --sizes tiny,small,base --out "$OUT/ops.jsonl" > "$OUT/ops.txt" 2>&1
echo "ops rc=$?" >> "$OUT/ops.txt"
F=../tests/fixtures
for f in llama qwen3 gemma2 gemma3 phi3 phi3-longrope; do
  for dt in f32 bf16; do
    echo "== $f $dt"
    ./llmtool eval --device cuda --dtype $dt --model $F/tiny-$f --data $F/tiny-llama/eval.txt --json 2>&1 | grep -E 'nll_mean|error'
    ./llmtool generate --device cuda --dtype $dt --model $F/tiny-$f --prompt "The model reads" --max-tokens 100 --temperature 0 2>/tmp/gen.err | md5sum
    grep -i error /tmp/gen.err
  done
done > "$OUT/families.txt" 2>&1
for f in llama qwen3 gemma2 gemma3 phi3; do
  cat > /tmp/ft-$f.yaml <<YAML
model:
  pretrained: $PWD/$F/tiny-$f
data:
  roots: [$PWD/../docs]
  dedup: none
training:
  device: cuda
  dtype: bf16
  seq_len: 64
  batch_size: 4
  max_steps: 20
  warmup_steps: 2
  lr: 0.001
  eval_every: 10
  save_every: 20
lora:
  r: 4
  alpha: 8
  target_modules: [all-linear]
output:
  dir: /tmp/ft-$f
YAML
  echo "== finetune $f"
  ./llmtool finetune /tmp/ft-$f.yaml --lora 2>&1 | grep -E "val|loss|error" | tail -4
done > "$OUT/finetune.txt" 2>&1
echo done
