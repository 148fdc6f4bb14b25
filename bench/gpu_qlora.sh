#!/usr/bin/env bash
# QLoRA on the GPU, in one device call: the op checks (the NF4 kernels among them) at the base
# preset; the tiny fixture's 4-bit base on CUDA (eval bare, eval with the PEFT adapter on the
# bitsandbytes checkpoint, greedy text through the 4-bit matrix-vector kernel); then the QLoRA
# rows at Llama-3.2-1B and Llama-3.1-8B shapes (LoRA r 16 on every linear layer, batch 4 x
# 2048, checkpointing) side by side with PEFT + bitsandbytes (bench/torch_ref.py
# --lora-base-dtype nf4), each row in its own process with nvidia-smi sampled every 100 ms for
# its peak device memory (context included).
#
# Carried in .device/: llmtool.gz (../shared/cuda/build.sh --bin llmtool), this script,
# torch_ref.py, and py/bitsandbytes (the bitsandbytes wheel unpacked with only
# libbitsandbytes_cuda130.so kept):
#   pip install --no-deps --target .device/py bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
#   find .device/py/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130.so' -delete
set -u
cd "$(dirname "$0")"
gunzip -f llmtool.gz && chmod +x llmtool
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} PYTHONPATH=$PWD/py
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
./llmtool --version >> "$OUT/gpu.txt" 2>&1
python3 -c 'import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, b.__version__)' >> "$OUT/gpu.txt" 2>&1

if [ "${OPS:-1}" = 1 ]; then # OPS=0 skips the op checks
  ./llmtool bench --ops --device cuda --sizes base --modes fp32,bf16 --out "$OUT/ops.jsonl" > "$OUT/ops.txt" 2>&1
  echo "ops rc=$?" >> "$OUT/ops.txt"
fi

F=../tests/fixtures
for dt in f32 bf16; do
  echo "== $dt"
  ./llmtool eval --device cuda --dtype $dt --nf4 --model $F/tiny-llama --data $F/tiny-llama/eval.txt --json
  ./llmtool eval --device cuda --dtype $dt --model $F/tiny-llama-nf4 --adapter $F/tiny-llama-lora --data $F/tiny-llama/eval.txt --json
  ./llmtool generate --device cuda --dtype $dt --nf4 --model $F/tiny-llama --prompt "The model reads" --max-tokens 24 --temperature 0
done > "$OUT/tiny.txt" 2>&1

peak() { # peak NAME COMMAND...: runs COMMAND, appends its peak nvidia-smi memory to smi.jsonl
  local name=$1 sampler rc
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/smi.txt &
  sampler=$!
  "$@"
  rc=$?
  kill $sampler
  echo "{\"row\": \"$name\", \"rc\": $rc, \"peak_smi_mb\": $(sort -n /tmp/smi.txt | tail -1)}" >> "$OUT/smi.jsonl"
}
common=(--tasks lora --modes bf16+ckpt --rank 16 --lora-targets all --batch 4 --seq 2048 --steps 5 --warmup 2 --out "$OUT/rows.jsonl")
for preset in ${PRESETS:-1b 8b}; do
  peak "llmtool $preset nf4" ./llmtool bench --device cuda --sizes $preset --lora-base nf4 "${common[@]}"
  peak "pytorch $preset nf4" python3 torch_ref.py --device cuda --sizes $preset --lora-base-dtype nf4 "${common[@]}"
done > "$OUT/rows.txt" 2>&1
