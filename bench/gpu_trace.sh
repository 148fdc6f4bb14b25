#!/usr/bin/env bash
# Where a GPU row's wall time goes between kernels: builds bench/gpu_trace.c against the
# machine's CUPTI, runs one `llmtool bench` row three times (plain, traced without driver calls,
# traced with them) and reads the last steps of each trace with bench/gpu_gaps.py. Run on a GPU
# machine beside a CUDA build of llmtool:
#   [LLMTOOL=./llmtool] [OUT=dir] bash gpu_trace.sh TAG MARKER [bench flags]
# e.g. `bash gpu_trace.sh 1b-train adamw_multi --sizes 1b --tasks train --modes bf16`
# (MARKER: a kernel that ends each step; argmax_finish ends a greedy decode step; GAPS_STEPS,
# default 2, how many of the last steps to read; TRACE_STEPS, default 4, the row's). Writes
# TAG.txt under OUT (default: here): the plain row, then both readings. The traced runs are
# slower than the plain one (CUPTI's own work, more so with driver calls): compare idle time
# between them, and attribute it with the second.
set -u
here=$(cd "$(dirname "$0")" && pwd)
LLMTOOL=${LLMTOOL:-$here/llmtool}
OUT=${OUT:-$PWD}
tag=$1 marker=$2
shift 2
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
tracer=${LLMTOOL_TRACER:-/tmp/gpu_trace.so}  # LLMTOOL_TRACER: one built elsewhere
if [[ ! -f $tracer ]]; then
  roots=(/usr/local $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null))
  header=$(find "${roots[@]}" -name cupti_activity.h 2>/dev/null | head -1)
  include=$(dirname "$header")
  library=$(find "$include/.." "${roots[@]}" -name 'libcupti.so*' 2>/dev/null | head -1)
  # The newest version of each record this CUPTI knows.
  newest() { grep -o "} $1[0-9]*;" "$header" | tr -d '}; ' | sort -V | tail -1; }
  gcc -O2 -shared -fPIC "$here/gpu_trace.c" -I"$include" "$library" -Wl,-rpath,"$(dirname "$library")" \
    -DKERNEL_RECORD="$(newest CUpti_ActivityKernel)" -DMEMCPY_RECORD="$(newest CUpti_ActivityMemcpy)" \
    -DMEMSET_RECORD="$(newest CUpti_ActivityMemset)" \
    -DSYNC_RECORD="$(newest CUpti_ActivitySynchronization)" -o "$tracer" ||
    { echo "gpu_trace.sh: could not build the tracer ($header, $library)" >&2; exit 1; }
fi
bench=("$LLMTOOL" bench --device cuda --steps "${TRACE_STEPS:-4}" --warmup 1 "$@")
{
  echo "# ${bench[*]}"
  "${bench[@]}" 2>&1 | tail -2
  echo "## traced, kernels and copies only"
  LLMTOOL_TRACE_OUT=/tmp/$tag-kernels.tsv LLMTOOL_TRACE_NO_API=1 LD_PRELOAD=$tracer \
    "${bench[@]}" 2>&1 | tail -2
  python3 "$here/gpu_gaps.py" "/tmp/$tag-kernels.tsv" "$marker" "${GAPS_STEPS:-2}" 2>&1 | head -12
  echo "## traced with driver calls"
  LLMTOOL_TRACE_OUT=/tmp/$tag.tsv LD_PRELOAD=$tracer "${bench[@]}" 2>&1 | tail -2
  python3 "$here/gpu_gaps.py" "/tmp/$tag.tsv" "$marker" "${GAPS_STEPS:-2}" 2>&1
} > "$OUT/$tag.txt"
xz -T4 -c "/tmp/$tag.tsv" > "$OUT/$tag.tsv.xz"
