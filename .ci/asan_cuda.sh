#!/usr/bin/env bash
# AddressSanitizer over the C++/CUDA kernels, no GPU needed: they are built for the CPU emulator
# (SPLAT_CUDA_EMULATE=1) with -fsanitize=address,alignment and run by the tests of the cuda backend
# (the ops' own, and the blocks' with backend="cuda"). Any read or write outside a tensor's memory,
# and any vector access at an address its width does not divide (which a GPU faults on and x86 does
# not), stops the run with the sanitizer's report and a non-zero exit: the emulator's counterpart
# of compute-sanitizer's memcheck, which the GPU script runs. Skips (exit 0) without libasan.
set -euo pipefail
cd "$(dirname "$0")/.."

asan=$(c++ -print-file-name=libasan.so)
if [[ $asan != /* || ! -f $asan ]]; then
  echo "asan_cuda: the host compiler has no libasan, skipping"
  exit 0
fi

export SPLAT_CUDA_EMULATE=1
export SPLAT_CUDA_EMULATE_CFLAGS="-fsanitize=address,alignment -fno-sanitize-recover=alignment -fno-omit-frame-pointer -g"
export TORCH_EXTENSIONS_DIR=${TMPDIR:-/tmp}/splat-asan-extensions  # apart from the plain build
export ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0 UBSAN_OPTIONS=print_stacktrace=1
# libstdc++ is preloaded as well, or ASan cannot intercept the exceptions of the ops' input checks.
# The emulator's fibers switch stacks, which ASan warns about once; it reported no false positive.
preload="$asan $(c++ -print-file-name=libstdc++.so.6)"
# Fail, rather than skip every cuda test, when the instrumented build does not load.
LD_PRELOAD=$preload python3 -c "import splat; ok, why = splat.backends()['cuda']; assert ok, why"
# -s: a sanitizer ends the process at once, so its report must not wait in pytest's capture.
LD_PRELOAD=$preload python3 -m pytest -q -s -p no:cacheprovider -k cuda \
  tests/test_cuda_backend.py tests/test_bn_add_relu.py tests/test_splat_conv.py tests/test_sk_conv.py tests/test_res2net.py tests/test_hardening.py
