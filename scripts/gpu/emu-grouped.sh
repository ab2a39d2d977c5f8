#!/usr/bin/env bash
# scripts/gpu/emu-grouped.sh — check the grouped expert GEMMs (kernels/grouped.cu: grouped_gate_up,
# grouped_down, grouped_fp8_gate_up, grouped_fp8_down, grouped_fill) here, without a GPU: the kernels are
# compiled as C++ against the SIMT emulator (scripts/gpu/emu/emu.h, which stands in for mma.sync, ldmatrix
# and cp.async) together with moe_plan and expert_combine (gemv.cu) and fp8_act_codes (quant_fp8.cu), and
# compared with a float64 host reference (scripts/gpu/emu/grouped_check.cpp): uneven experts, experts
# without tokens, several 128-row tiles, top-k 1 and 2, experts held elsewhere, a decode batch, K and N
# tails. The fp8 kernels are checked twice: on the emulated m16n8k32 E4M3 mma, and on its fallback (two
# f16 mmas on widened codes, -DGG_E4M3_VIA_F16). It checks indexing, fragment layouts, the tile schedule
# and the epilogues, not speed or what ptxas accepts (scripts/gpu/nvrtc-check.sh). Needs g++ with C++20;
# takes a few minutes (a thread per emulated CUDA thread).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh kernels/gemv.cu kernels/quant.cu kernels/quant_fp8.cu kernels/grouped.cu
} | sed -e 's/extern "C" //' -e 's/extern __shared__ \([a-z0-9_]*\) \([a-z_]*\)\[\];/static \1 \2[16384];/' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/grouped_check.cpp "$tmp/"
build() { ${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas "$@" "$tmp/grouped_check.cpp"; }
build -o "$tmp/grouped_check"
build -DGG_E4M3_VIA_F16 -o "$tmp/grouped_check_f16"
"$tmp/grouped_check"
echo "emu-grouped: the fp8 kernels again on the f16 fallback of the E4M3 mma"
"$tmp/grouped_check_f16" fp8
echo "emu-grouped: kernels/grouped.cu ok"
