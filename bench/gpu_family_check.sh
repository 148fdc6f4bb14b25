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
# The md5 of the same greedy text on the CPU (release build of b8a7de5 and of e414a66 alike,
# 2026-12-05): a GPU text that differs in f32 is a bug to look at; in bf16 the kernels round
# differently, so a difference there is only a lead.
declare -A cpu=(
  [llama-f32]=81402e727d145da393acbcc56811b307 [llama-bf16]=79551a0410cc989caf3018094e865c39
  [qwen3-f32]=37c9f83590f0ed91b2bcca270449dc4a [qwen3-bf16]=adc0b614d7fac53704d6b12fec795e51
  [gemma2-f32]=b5643b28b9ffb09959f522b37ecb2a2b [gemma2-bf16]=b5643b28b9ffb09959f522b37ecb2a2b
  [gemma3-f32]=807b16d4bda58e8597da3ea2f6556c82 [gemma3-bf16]=68a4d5d5873d75168d28bf84e73ab6b0
  [phi3-f32]=151b4f31119377a829c0bc54e7bb3ac7 [phi3-bf16]=151b4f31119377a829c0bc54e7bb3ac7
  [phi3-longrope-f32]=a06ab696c1893b849dd8c87a085e50cc [phi3-longrope-bf16]=c332da87ed1c670ee768c963e20115c2
)
for f in llama qwen3 gemma2 gemma3 phi3 phi3-longrope; do
  for dt in f32 bf16; do
    echo "== $f $dt"
    ./llmtool eval --device cuda --dtype $dt --model $F/tiny-$f --data $F/tiny-llama/eval.txt --json 2>&1 | grep -E 'nll_mean|error'
    md5=$(./llmtool generate --device cuda --dtype $dt --model $F/tiny-$f --prompt "The model reads" --max-tokens 100 --temperature 0 2>/tmp/gen.err | md5sum | cut -c1-32)
    [ "$md5" = "${cpu[$f-$dt]}" ] && echo "greedy text $md5: as on the CPU" || echo "greedy text $md5: the CPU's is ${cpu[$f-$dt]}"
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
