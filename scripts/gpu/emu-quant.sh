#!/usr/bin/env bash
# scripts/gpu/emu-quant.sh — check the quantised-weight kernels (kernels/quant*.cu) here, without a GPU: the
# kernels are compiled as C++ against a small SIMT emulator (scripts/gpu/emu/emu.h: a thread per CUDA
# thread, barriers for __syncthreads and shuffles) and compared with host references
# (scripts/gpu/emu/quant_check.cpp). It checks indexing, packing and the reduction structure, not speed,
# inline PTX or what NVRTC alone accepts (make kernels-check parses the CUDA). Needs g++ with C++20
# (<barrier>); takes about a minute (it starts a thread per emulated CUDA thread). SANITIZE=1 builds with
# AddressSanitizer, which also catches reads past the inputs (rows or channels a clamp let through).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh
	echo '#define GRID_STRIDE(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)'
	cat kernels/gemv.cu kernels/quant.cu kernels/quant_fp8.cu kernels/quant_fp8gemm.cu kernels/quant_int4.cu
} | sed -e 's/extern "C" //' -e 's/extern __shared__ int plan_sh\[\];/static int plan_sh[8192];/' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/quant_check.cpp "$tmp/"
${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas ${SANITIZE:+-fsanitize=address} -o "$tmp/quant_check" "$tmp/quant_check.cpp"
"$tmp/quant_check" "$@"
echo "emu-quant: kernels/quant.cu, quant_fp8.cu, quant_fp8gemm.cu and quant_int4.cu ok"
