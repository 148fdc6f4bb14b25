#!/usr/bin/env bash
# Where a training step's GPU time goes: runs one `llmtool bench` row under ncu (each kernel's
# duration and DRAM bytes read; NCU_WARMUP warm-up steps, default 2, then one timed step) and
# prints the last step's kernels, grouped by name and by launch shape (bench/ncu_step.py
# --last). Run on a GPU machine beside a CUDA binary built with `../shared/cuda/build.sh --bin llmtool`:
#   [LLMTOOL=./llmtool] [OUT=dir] bash gpu_profile_step.sh SIZE TASK MODE [more bench flags]
# e.g. `bash gpu_profile_step.sh 1b lora bf16+ckpt --rank 16 --lora-targets all --batch 4
# --seq 2048`. Writes ncu-SIZE-TASK-MODE.csv and .txt under OUT (default: here). ncu times
# each kernel alone, so the sum leaves out launch gaps; compare it with the row's own step time,
# printed first (the same row without ncu). NCU_STEP_END=NAME ends each step at a kernel whose name
# contains NAME (e.g. adamw) instead of finding two equal steps.
set -u
here=$(cd "$(dirname "$0")" && pwd)
LLMTOOL=${LLMTOOL:-$here/llmtool}
OUT=${OUT:-$PWD}
size=$1 task=$2 mode=$3
shift 3
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
name="ncu-$size-$task-${mode/+/_}"
bench=("$LLMTOOL" bench --device cuda --sizes "$size" --tasks "$task" --modes "$mode" "$@")
"${bench[@]}" --steps 5 --warmup 2 2>&1 | tail -2 > "$OUT/$name.txt"
start=$(date +%s)
"$NCU" --clock-control none --cache-control none --csv \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size,launch__block_size \
  "${bench[@]}" --steps 1 --warmup "${NCU_WARMUP:-2}" > "$OUT/$name.csv" 2> "$OUT/$name.err"
echo "ncu rc=$? in $(($(date +%s) - start)) s" >> "$OUT/$name.txt"
python3 "$here/ncu_step.py" "--last${NCU_STEP_END:+=$NCU_STEP_END}" "$OUT/$name.csv" >> "$OUT/$name.txt" 2>&1
