#!/usr/bin/env bash
# scripts/gpu/emu-vision.sh — check the encoder kernels (kernels/encoder.cu: layernorm, add_bias, gelu,
# rotate_pairs, full_attention; the vision tower's ops) here, without a GPU: the kernels are compiled as
# C++ against the SIMT emulator (scripts/gpu/emu/emu.h) and compared with a float64 host reference
# (scripts/gpu/emu/encoder_check.cpp). full_attention's dynamic shared memory becomes a static array. It
# checks indexing, the online softmax and the reductions, not speed. Needs g++ with C++20; takes about a
# minute.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh kernels/encoder.cu
} | sed -e 's/extern "C" //' -e 's/extern __shared__ float enc_smem\[\];/static float enc_smem[16 * 128 + 32 * 129 + 32 * 128];/' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/encoder_check.cpp "$tmp/"
${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas -o "$tmp/encoder_check" "$tmp/encoder_check.cpp"
"$tmp/encoder_check"
echo "emu-vision: kernels/encoder.cu ok"
