#!/usr/bin/env bash
# Compile check of the C++/CUDA sources, no GPU needed: every csrc/*.cu with nvcc for sm_90 and
# every csrc/*.cpp with the host compiler, compile only, against the installed torch's headers.
# Skips (exit 0) where nvcc is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc=${NVCC:-$(command -v nvcc || true)}
if [[ -z $nvcc && -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]]; then nvcc=$CUDA_HOME/bin/nvcc; fi
if [[ -z $nvcc && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z $nvcc ]]; then
  echo "check_cuda: nvcc not found, skipping the CUDA compile check"
  exit 0
fi

# Include flags and defines as torch.utils.cpp_extension would pass them (fails without torch).
torch_flags=$(python3 - <<'PY'
import os, sysconfig
import torch
from torch.utils import cpp_extension
incs = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
for d in incs:
    print(f"-I{d}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# CPU wheels of torch lack this header generated for CUDA builds; it only sets Windows DLL macros.
if not os.path.exists(os.path.join(incs[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")):
    print("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
PY
)
mapfile -t flags <<<"$torch_flags"
common=(-std=c++20 -O2 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -Icsrc "${flags[@]}")
nvcc_flags=(-gencode arch=compute_90,code=sm_90 -Xcompiler -fPIC --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__)

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "check_cuda: $("$nvcc" --version | tail -n 1)"

compile() {  # compile SOURCE: prints ok/FAIL and the compiler's output
  local src=$1 log="$out/$(basename "$1").log" obj="$out/$(basename "$1").o" rc=0
  if [[ $src == *.cu ]]; then
    "$nvcc" "${common[@]}" "${nvcc_flags[@]}" -c "$src" -o "$obj" >"$log" 2>&1 || rc=$?
  else
    "${CXX:-c++}" "${common[@]}" -fPIC -c "$src" -o "$obj" >"$log" 2>&1 || rc=$?
  fi
  if ((rc == 0)); then echo "check_cuda: ok    $src"; else echo "check_cuda: FAIL  $src"; fi
  cat "$log"
  return $rc
}

# One compiler per core: nvcc on the torch headers takes ~1 GB and a minute per file.
status=0 running=0
for src in csrc/*.cu csrc/*.cpp; do
  [[ -e $src ]] || continue
  if ((running >= $(nproc))); then
    wait -n || status=1
    running=$((running - 1))
  fi
  compile "$src" &
  running=$((running + 1))
done
while ((running > 0)); do
  wait -n || status=1
  running=$((running - 1))
done
exit $status
