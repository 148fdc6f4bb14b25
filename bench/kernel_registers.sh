#!/usr/bin/env bash
# What ptxas gives each of llmtool's CUDA kernels on one GPU architecture: registers a thread,
# bytes spilled to local memory (stores and loads) and stack, from the same sources and flags
# crates/ops/build.rs compiles. Needs nvcc (NVCC, else PATH: `source .ci/cuda-toolkit.sh` puts
# the one from the Python package registry there), no GPU. A kernel that spills under its
# __launch_bounds__ reads and writes local memory where registers would do (flash_mma_bwd_kv
# spilled 392 bytes a thread at head size 64 before it took its query tiles in halves).
#   bash bench/kernel_registers.sh [CAPABILITY (default 90)] [NAME FILTER (a grep pattern)]
# e.g. `bash bench/kernel_registers.sh 90 flash_mma`. Prints one line a kernel, spilling ones
# first.
set -euo pipefail
cap=${1:-90}
# build.rs compiles capability 9.0 as sm_90a (the Hopper flash kernels' warpgroup instructions).
[ "$cap" = 90 ] && cap=90a
filter=${2:-.}
here=$(cd "$(dirname "$0")/.." && pwd)
nvcc=${NVCC:-nvcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
(cd "$here/crates/ops" && "$nvcc" --cubin -O3 -std=c++17 -gencode "arch=compute_$cap,code=sm_$cap" \
  -Xptxas -v kernels/ops.cu -o "$out/ops.cubin") > "$out/ptxas.txt" 2>&1
python3 - "$out/ptxas.txt" "$filter" <<'EOF'
import re, sys
text, pattern = open(sys.argv[1]).read(), re.compile(sys.argv[2])
rows, name = [], None
for line in text.splitlines():
    if m := re.search(r"Compiling entry function '([^']+)'", line):
        name, row = m.group(1), {}
    elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        row.update(stack=int(m[1]), stores=int(m[2]), loads=int(m[3]))
    elif name and (m := re.search(r"Used (\d+) registers", line)):
        row["registers"] = int(m[1])
        if pattern.search(name):
            rows.append((name, row))
        name = None
rows.sort(key=lambda r: (-(r[1].get("stores", 0) + r[1].get("loads", 0)), r[0]))
print(f"{'kernel':<44} {'registers':>9} {'spill stores':>12} {'spill loads':>11} {'stack':>6}")
for name, r in rows:
    print(f"{name:<44} {r['registers']:>9} {r.get('stores', 0):>12} {r.get('loads', 0):>11} {r.get('stack', 0):>6}")
EOF
