#!/usr/bin/env bash
# scripts/gpu/emu-grouped.sh — check the grouped expert GEMMs (kernels/grouped.cu: grouped_gate_up,
# grouped_down, grouped_fill) here, without a GPU: the kernels are compiled as C++ against the SIMT emulator
# (scripts/gpu/emu/emu.h, which stands in for mma.sync, ldmatrix and cp.async) together with moe_plan and
# expert_combine (gemv.cu), and compared with a float64 host reference (scripts/gpu/emu/grouped_check.cpp):
# uneven experts, experts without tokens, several 128-row tiles, top-k 1 and 2, experts held elsewhere, K
# and N tails. It checks indexing, fragment layouts, the tile schedule and the epilogues, not speed or what
# ptxas accepts (scripts/gpu/nvrtc-check.sh). Needs g++ with C++20; takes a few minutes (a thread per
# emulated CUDA thread).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh kernels/gemv.cu kernels/grouped.cu
} | sed -e 's/extern "C" //' -e 's/extern __shared__ \([a-z0-9_]*\) \([a-z_]*\)\[\];/static \1 \2[16384];/' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/grouped_check.cpp "$tmp/"
${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas -o "$tmp/grouped_check" "$tmp/grouped_check.cpp"
"$tmp/grouped_check"
echo "emu-grouped: kernels/grouped.cu ok"
