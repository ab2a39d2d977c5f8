#!/usr/bin/env bash
# scripts/gpu/emu-attention.sh — check the paged KV cache kernels (kv_append, attention, attention_split,
# attention_combine in kernels/attention.cu; attention_decode and attention_flash in kernels/flash.cu) here,
# without a GPU: the kernels are compiled as C++ against the SIMT emulator (scripts/gpu/emu/emu.h, which
# also stands in for flash.cu's PTX: mma.sync, ldmatrix, cp.async) and compared with a host reference over
# the logical cache (scripts/gpu/emu/attention_check.cpp): blocks scattered over a pool, block tables,
# dropped blocks, block sizes 1 to 64, several caches of different block sizes in one launch, the batched
# decode kernel's split over blocks at several grid sizes. It checks indexing, fragment layouts and the
# reduction structure, not speed. Needs g++ with C++20; takes a few minutes (more on a busy machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh kernels/attention.cu kernels/flash.cu
} | sed -e 's/extern "C" //' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/attention_check.cpp "$tmp/"
${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas -o "$tmp/attention_check" "$tmp/attention_check.cpp"
"$tmp/attention_check"
echo "emu-attention: kernels/attention.cu and kernels/flash.cu ok"
