#!/usr/bin/env bash
# Op checks with packed-row segments (edge + tiny), then --num-samples batches
# on CUDA against single runs.
cd "$(dirname "$0")"
gunzip -f llmtool.gz && chmod +x llmtool
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
F=../tests/fixtures
timeout 100 ./llmtool bench --ops --device cuda --sizes tiny --modes fp32,bf16 --steps 1 --out "$OUT/ops-tiny.jsonl" > "$OUT/ops.txt" 2>&1
echo "rc=$?" >> "$OUT/ops.txt"
{
for f in llama phi3 gemma2; do
  for dt in f32 bf16; do
    args=(--device cuda --dtype $dt --model $F/tiny-$f --prompt "The model reads" --max-tokens 24 --temperature 0.8 --top-k 20)
    echo "== $f $dt batch"
    timeout 30 ./llmtool generate "${args[@]}" --num-samples 3 --seed 7 2>/tmp/err.txt | md5sum; grep -i -E "error|op by op" /tmp/err.txt
    echo "== $f $dt singles"
    for s in 7 8 9; do echo "--- sample $((s-6)) of 3 ---"; timeout 30 ./llmtool generate "${args[@]}" --seed $s 2>/dev/null; done > /tmp/singles.txt
    md5sum < /tmp/singles.txt
    timeout 30 ./llmtool generate "${args[@]}" --num-samples 3 --seed 7 2>/dev/null > /tmp/batch.txt
    diff /tmp/batch.txt /tmp/singles.txt > /dev/null && echo SAME || { echo DIFFERENT; diff /tmp/batch.txt /tmp/singles.txt | head -8; }
  done
done
} > "$OUT/samples.txt" 2>&1
