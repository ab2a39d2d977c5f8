#!/usr/bin/env bash
# scripts/gpu/emu-attention.sh — check the paged KV cache kernels (kv_append, attention, attention_split,
# attention_combine in kernels/attention.cu) here, without a GPU: the kernels are compiled as C++ against the
# SIMT emulator (scripts/gpu/emu/emu.h) and compared with a host reference over the logical cache
# (scripts/gpu/emu/attention_check.cpp): blocks scattered over a pool, block tables, dropped blocks, block
# sizes 1 to 64, several caches of different block sizes in one launch. It checks indexing and the
# reduction structure, not speed. attention_flash (flash.cu, inline PTX: mma, ldmatrix, cp.async) cannot
# run here: TestFlashAttention on the GPU covers its block-table reads. Needs g++ with C++20; takes about a
# minute (plus a few on a busy machine for the model-sized chunked case).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh kernels/attention.cu
} | sed -e 's/extern "C" //' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/attention_check.cpp "$tmp/"
${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas -o "$tmp/attention_check" "$tmp/attention_check.cpp"
"$tmp/attention_check"
echo "emu-attention: kernels/attention.cu ok"
