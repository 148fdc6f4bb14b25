#!/usr/bin/env bash
# Data parallel on a multi-GPU machine, in one device call (issue 16's GPU half): scaling of
# the base preset's bf16 training and of the 1B LoRA row (r 16 on every linear layer, batch 4 x
# 2048 a GPU) on 1, 2, 4 and 8 GPUs (as many as the machine has), llmtool side by side with
# PyTorch DDP under torchrun (bench/torch_ref.py), each row its own command; then the loss
# curve of `train --gpus N` against one GPU with `grad_accum` N on docs/bench/tiny-50.yaml.
#
# Carried in .device/: llmtool.gz built with NCCL,
#   ../shared/cuda/build.sh --bin llmtool --features nccl
# (libnccl gets a link-time stand-in there; at run time PyTorch's own libnccl.so.2 is loaded,
# found below; a stand-in made before any NCCL symbol was referenced lacks them: delete
# ~/.cache/llmtool-cuda/stubs/libnccl.so and build again), this script, torch_ref.py,
# tiny-50.yaml and corpus/ (copies of docs/ and data/).
# GPUS="2 4" limits the counts; STEPS sets the timed steps (default 10).
set -u
cd "$(dirname "$0")"
gunzip -f llmtool.gz && chmod +x llmtool
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${nccl:+$nccl:}${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
available=$(nvidia-smi --list-gpus | wc -l)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
./llmtool --version >> "$OUT/gpu.txt" 2>&1
python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.nccl.version())' >> "$OUT/gpu.txt" 2>&1
echo "libnccl from ${nccl:-the system}" >> "$OUT/gpu.txt"

counts=""
for n in ${GPUS:-1 2 4 8}; do
  [ "$n" -le "$available" ] && counts="$counts $n"
done
steps=(--steps "${STEPS:-10}" --warmup 3)
base=(--device cuda --sizes base --tasks train --modes bf16 --batch 16 --seq 512 "${steps[@]}")
lora=(--device cuda --sizes 1b --tasks lora --modes bf16 --batch 4 --seq 2048 --rank 16 --lora-targets all "${steps[@]}")
for n in $counts; do
  echo "== $n GPUs"
  ./llmtool bench "${base[@]}" --gpus "$n" --out "$OUT/rows.jsonl"
  torchrun --nproc-per-node "$n" torch_ref.py "${base[@]}" --out "$OUT/rows.jsonl"
  ./llmtool bench "${lora[@]}" --lora-base frozen16 --gpus "$n" --out "$OUT/rows.jsonl"
  torchrun --nproc-per-node "$n" torch_ref.py "${lora[@]}" --lora-base-dtype bf16 --out "$OUT/rows.jsonl"
done > "$OUT/rows.txt" 2>&1

# The loss curve: N GPUs against one GPU accumulating N micro-batches.
for n in $counts; do
  [ "$n" -gt 1 ] || continue
  ./llmtool train tiny-50.yaml --device cuda --force --set training.dtype=bf16 --gpus "$n" \
    --set output.dir=runs/dp$n > /dev/null 2>&1
  ./llmtool train tiny-50.yaml --device cuda --force --set training.dtype=bf16 \
    --set training.grad_accum=$n --set output.dir=runs/one$n > /dev/null 2>&1
  cp runs/dp$n/metrics.jsonl "$OUT/curve-$n-gpus.jsonl"
  cp runs/one$n/metrics.jsonl "$OUT/curve-$n-accum.jsonl"
done
tar -cJf "$OUT/curves.tar.xz" -C "$OUT" $(cd "$OUT" && ls curve-*.jsonl 2>/dev/null) && rm -f "$OUT"/curve-*.jsonl
