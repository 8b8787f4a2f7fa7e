#!/usr/bin/env bash
# Compile-only check of the CUDA sources (nothing built here runs: CI machines have no GPU).
#  * csrc/cuda/*.cu (plain CUDA, no torch) for sm_80 and sm_90a with every warning an error; each
#    kernel's registers are reported and a kernel that spills to local memory fails the check.
#  * csrc/cuda/*.cpp (the thin torch bindings) with g++ -Wall -Wextra -Werror against the installed
#    torch's headers, when torch is importable. A CPU build of torch ships the CUDA headers except
#    one generated at build time (c10/cuda/impl/cuda_cmake_macros.h); a stand-in is supplied.
#   bash csrc/cuda/compile_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC="${NVCC:-nvcc}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
status=0
for cu in csrc/cuda/*.cu; do
  name="$(basename "$cu" .cu)"
  for arch in 80 90a; do
    log="$OUT/$name-sm_$arch.log"
    # The flags setup.py and torch's cpp_extension pass in a CUDA build (C++17, no implicit half
    # conversions), so what passes here compiles there.
    if ! "$NVCC" -std=c++17 -O3 --use_fast_math -lineinfo -Icsrc -DPYHAPPY_WITH_CUDA \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
        -gencode "arch=compute_${arch},code=sm_${arch}" \
        -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -Xptxas -v,-warn-spills,-warn-lmem-usage \
        -c "$cu" -o "$OUT/$name-sm_$arch.o" >"$log" 2>&1; then
      grep -v "^ptxas info" "$log" | grep -v "bytes stack frame" | head -40
      echo "compile_check: FAIL $cu for sm_$arch"
      status=1
      continue
    fi
    kernels=$(grep -c "Compiling entry function" "$log" || true)
    maxreg=$(grep -oE "Used [0-9]+ registers" "$log" | awk '{print $2}' | sort -n | tail -1)
    echo "compile_check: ok $cu sm_$arch ($kernels kernels, at most ${maxreg:-0} registers a thread, no spills)"
  done
done

TORCH_INC="$(python -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null || true)"
CUDA_INC="${CUDA_HOME:-$(python -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null || true)}"
CUDA_INC="${CUDA_INC:-/usr/local/cuda}/include"
if [ -n "$TORCH_INC" ]; then
  mkdir -p "$OUT/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  sys=(-isystem "$OUT/stub" -isystem "$CUDA_INC")
  for d in $TORCH_INC; do sys+=(-isystem "$d"); done
  for cpp in csrc/cuda/*.cpp; do
    if g++ -std=c++20 -Wall -Wextra -Werror -fsyntax-only -DPYHAPPY_WITH_CUDA -Icsrc "${sys[@]}" "$cpp"; then
      echo "compile_check: ok $cpp (g++ against torch's headers)"
    else
      echo "compile_check: FAIL $cpp"
      status=1
    fi
  done
else
  echo "compile_check: torch not importable; skipped the bindings (csrc/cuda/*.cpp)"
fi
exit $status
