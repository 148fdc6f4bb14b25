#!/usr/bin/env bash
# The machine code (SASS) of llmtool's CUDA kernels on one GPU architecture, counted by opcode:
# for each kernel whose name matches, its static instructions, the tensor-core products (HMMA),
# shared-memory matrix loads (LDSM), asynchronous copies (LDGSTS), barriers, and the most
# frequent opcodes. Needs nvcc (`source .ci/cuda-toolkit.sh`), cuobjdump and the nvdisasm it
# runs, which it installs from the Python package registry into that script's venv when
# missing; no GPU. Static counts say
# where a loop's instructions go before a profile does: the flash kernels' tile copies spent
# about 200 integer instructions a tile on addresses, which one base address and fixed steps
# removed (forward 6,736 -> 6,024 instructions, key/value gradients 6,456 -> 5,448).
#   bash bench/kernel_sass.sh [CAPABILITY (default 90)] [NAME FILTER (a grep pattern)] [TOP (12)]
# e.g. `bash bench/kernel_sass.sh 90 'flash_mma_.*d64_bf16'`. SASS=DIR keeps each kernel's
# listing there (DIR/NAME.sass).
set -euo pipefail
cap=${1:-90}
# build.rs compiles capability 9.0 as sm_90a (the Hopper flash kernels' warpgroup instructions).
[ "$cap" = 90 ] && cap=90a
filter=${2:-.}
top=${3:-12}
here=$(cd "$(dirname "$0")/.." && pwd)
nvcc=${NVCC:-$(command -v nvcc)}
bin=$(dirname "$nvcc")
if [[ ! -x $bin/cuobjdump || ! -x $bin/nvdisasm ]]; then
  echo "kernel_sass.sh: installing cuobjdump and nvdisasm next to $nvcc" >&2
  "${LLMTOOL_CUDA_TOOLKIT:-$HOME/.cache/llmtool-cuda}/venv/bin/pip" install -q \
    --disable-pip-version-check nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm >&2
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
(cd "$here/crates/ops" && "$nvcc" --cubin -O3 -std=c++17 -gencode "arch=compute_$cap,code=sm_$cap" \
  kernels/ops.cu -o "$out/ops.cubin")
"$bin/cuobjdump" -sass "$out/ops.cubin" > "$out/ops.sass"
python3 - "$out/ops.sass" "$filter" "$top" "${SASS:-}" <<'EOF'
import collections, os, re, sys
path, pattern, top, keep = sys.argv[1], re.compile(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
kernels, name = {}, None
for line in open(path):
    if m := re.match(r"\s+Function : (\S+)", line):
        name = m.group(1)
        kernels[name] = ([], [])
    elif name and (m := re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
        kernels[name][0].append(m.group(1))
        kernels[name][1].append(line.rstrip())
for name in sorted(k for k in kernels if pattern.search(k)):
    ops, lines = kernels[name]
    count = collections.Counter(ops)
    print(f"{name}: {len(ops)} instructions, HMMA {count['HMMA']}, LDSM {count['LDSM']}, "
          f"LDGSTS {count['LDGSTS']}, BAR {count['BAR']}")
    print("  " + ", ".join(f"{op} {n}" for op, n in count.most_common(top)))
    if keep:
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, name + ".sass"), "w") as f:
            f.write("\n".join(lines) + "\n")
EOF
