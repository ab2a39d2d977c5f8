#!/usr/bin/env bash
# scripts/gpu/emu-fused.sh — check the fused decode kernels (route_plan in kernels/moe.cu; gemv_gated_N,
# expert_gemv_swiglu_N and expert_gemv_combine_N in gemv.cu, their int4 and fp8 counterparts in
# quant_int4.cu and quant_fp8.cu; qk_append in qkv.cu) and the 16-byte
# elementwise kernels (*_v8 in elementwise.cu and gemv.cu) here, without a GPU: the kernels are compiled as
# C++ against the SIMT emulator (scripts/gpu/emu/emu.h) and compared with the kernels they replace, run
# the same way, bit for bit (scripts/gpu/emu/fused_check.cpp). It checks indexing, the reductions' order
# and the last-block hand-off of the fused epilogues, not speed or inline PTX. Needs g++ with C++20; takes
# a few minutes on a busy machine (a thread per emulated CUDA thread).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh kernels/elementwise.cu kernels/gemv.cu kernels/quant.cu kernels/quant_fp8.cu kernels/quant_int4.cu kernels/moe.cu kernels/expert_count.cu kernels/attention.cu kernels/qkv.cu
} | sed -e 's/extern "C" //' -e 's/extern __shared__ \([a-z]*\) \([a-z_]*\)\[\];/static \1 \2[16384];/' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/fused_check.cpp "$tmp/"
${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas -o "$tmp/fused_check" "$tmp/fused_check.cpp"
"$tmp/fused_check"
echo "emu-fused: the fused and 16-byte kernels equal the kernels they replace"
