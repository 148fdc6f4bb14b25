#!/usr/bin/env bash
# Decoding at real scale on a GPU machine: llmtool's generate rows (batch 1, bf16) for the
# base, 1b and 8b shapes, HF generate on the 1b in the same call, the device's bandwidth and
# matrix rate (bench/gpu_rates.py: the read bandwidth is the bound a decode step is held to),
# and an ncu breakdown of one decode step's kernels. Run from `.device/` beside a CUDA binary
# built with `../shared/cuda/build.sh --bin llmtool` and copies of bench/torch_ref.py,
# bench/gpu_rates.py and bench/ncu_step.py (docs/benchmarks.md, "Decoding at real scale").
#   [LLMTOOL=./llmtool] [TAG=name] [TORCH=0] [PROFILE=0] [NCU_SIZES="1b 8b"] [BANDWIDTH=0] bash gpu_decode.sh
# LLMTOOL picks the binary (two builds side by side: run once per binary, each with its own
# TAG, which names the output files); TORCH=0, PROFILE=0 and BANDWIDTH=0 skip HF generate, the
# ncu breakdown and the rates. Other environment variables reach llmtool as they are.
cd "$(dirname "$0")"
[ -f llmtool.gz ] && gunzip -f llmtool.gz && chmod +x llmtool
LLMTOOL=${LLMTOOL:-./llmtool}
TAG=${TAG:-decode}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,driver_version,clocks.max.mem --format=csv >> "$OUT/$TAG.txt"
[ "${BANDWIDTH:-1}" = 1 ] && timeout 90 python3 gpu_rates.py >> "$OUT/$TAG.txt" 2>&1
for size in base 1b 8b; do
  timeout 200 "$LLMTOOL" bench --device cuda --sizes $size --tasks generate --modes bf16 --steps 8 \
    --out "$OUT/$TAG-llmtool.jsonl" >> "$OUT/$TAG.txt" 2>&1; echo "$size rc=$?" >> "$OUT/$TAG.txt"
done
[ "${TORCH:-1}" = 1 ] && { timeout 120 python3 torch_ref.py --device cuda --sizes 1b --tasks generate \
  --modes bf16 --steps 4 --out "$OUT/$TAG-torch.jsonl" >> "$OUT/$TAG.txt" 2>&1
  echo "torch rc=$?" >> "$OUT/$TAG.txt"; }
[ "${PROFILE:-1}" = 1 ] || exit 0
# One decode step's kernels (each timed alone, so launch gaps are not in these durations):
# skip the setup and the prompt, then take 600 launches from the middle of the decode loop.
for size in ${NCU_SIZES:-1b 8b}; do
  skip=$([ $size = 1b ] && echo 4000 || echo 8000)
  timeout 150 "$NCU" --clock-control none --launch-skip $skip --launch-count 600 --csv \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size,launch__block_size \
    "$LLMTOOL" bench --device cuda --sizes $size --tasks generate --modes bf16 --steps 1 \
    > "ncu-$size.csv" 2> "ncu-$size.err"; echo "ncu $size rc=$?" >> "$OUT/$TAG.txt"
  python3 ncu_step.py "ncu-$size.csv" >> "$OUT/$TAG.txt" 2>&1
done
