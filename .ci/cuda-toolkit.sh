#!/usr/bin/env bash
# nvcc 13.0 and the CUDA headers from the Python package registry, for checking and linting the
# `cuda` feature on a machine with no GPU and no CUDA toolkit (no libraries are linked, so the
# link-time stand-ins of ../shared/cuda/build.sh are not needed).
#
#   source .ci/cuda-toolkit.sh        installs once, then exports PATH, CUDA_ROOT/PATH/HOME and
#                                     CUDA_COMPUTE_CAP into the calling shell
#   eval "$(.ci/cuda-toolkit.sh)"     the same, from a script run as a program (prints the exports)
#
# The venv lives in $LLMTOOL_CUDA_TOOLKIT (default ~/.cache/llmtool-cuda, the directory
# ../shared/cuda/build.sh uses, so either one reuses the other's install). About 300 MB, 15 s.

_llmtool_find_nvcc() { find "$1/venv" -path '*/nvidia/cu13/bin/nvcc' 2>/dev/null | head -1 || true; }

llmtool_cuda_toolkit() {
  local toolkit=${LLMTOOL_CUDA_TOOLKIT:-$HOME/.cache/llmtool-cuda}
  local pins="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88"
  local nvcc
  mkdir -p "$toolkit" || { echo "cuda-toolkit.sh: cannot create $toolkit" >&2; return 1; }
  nvcc=$(_llmtool_find_nvcc "$toolkit")
  if [[ ! -x $nvcc || ! -f $toolkit/venv/.installed ]]; then
    # One installer at a time (CI and build.sh may share the directory).
    (
      flock 9 2>/dev/null || true
      nvcc=$(_llmtool_find_nvcc "$toolkit")
      [[ -x $nvcc && -f $toolkit/venv/.installed ]] && exit 0
      echo "cuda-toolkit.sh: installing nvcc 13.0 from PyPI into $toolkit" >&2
      # shellcheck disable=SC2086
      { python3 -m venv "$toolkit/venv" &&
        "$toolkit/venv/bin/pip" install -q --disable-pip-version-check $pins &&
        touch "$toolkit/venv/.installed"; } >"$toolkit/install.log" 2>&1
    ) 9>"$toolkit/.lock" || {
      echo "cuda-toolkit.sh: pip could not install nvcc 13.0 from PyPI into $toolkit" \
        "(is the registry reachable? see $toolkit/install.log)" >&2
      return 1
    }
    nvcc=$(_llmtool_find_nvcc "$toolkit")
  fi
  if [[ ! -x $nvcc ]] || ! "$nvcc" --version >/dev/null 2>&1; then
    echo "cuda-toolkit.sh: no working nvcc under $toolkit/venv (delete $toolkit/venv to reinstall)" >&2
    return 1
  fi
  local cu
  cu=$(dirname "$(dirname "$nvcc")")
  export PATH=$cu/bin:$PATH CUDA_ROOT=$cu CUDA_PATH=$cu CUDA_HOME=$cu
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
  llmtool_cuda_toolkit
else
  set -euo pipefail
  llmtool_cuda_toolkit
  printf 'export %s=%q\n' PATH "$PATH" CUDA_ROOT "$CUDA_ROOT" CUDA_PATH "$CUDA_PATH" \
    CUDA_HOME "$CUDA_HOME" CUDA_COMPUTE_CAP "$CUDA_COMPUTE_CAP"
fi
