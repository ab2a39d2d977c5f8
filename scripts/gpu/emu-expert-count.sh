#!/usr/bin/env bash
# scripts/gpu/emu-expert-count.sh — check count_experts (kernels/expert_count.cu: tokens per expert slot
# counted on the device, backend.ExpertTally) here, without a GPU: the kernel and map_experts
# (kernels/expert_map.cu), which feeds it under replicas, are compiled as C++ against the SIMT emulator
# (scripts/gpu/emu/emu.h, one std::thread per CUDA thread, so the atomics really contend) and compared
# with host counts (scripts/gpu/emu/expert_count_check.cpp). Needs g++ with C++20; takes under a minute (thread start-up).
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh kernels/expert_map.cu kernels/expert_count.cu
} | sed -e 's/extern "C" //' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/expert_count_check.cpp "$tmp/"
${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas -o "$tmp/expert_count_check" "$tmp/expert_count_check.cpp"
"$tmp/expert_count_check"
echo "emu-expert-count: kernels/expert_count.cu ok"
