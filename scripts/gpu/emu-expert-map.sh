#!/usr/bin/env bash
# scripts/gpu/emu-expert-map.sh — check map_experts (kernels/expert_map.cu: a routing's choices sent to
# the replicas of hot experts) here, without a GPU: the kernel is compiled as C++ against the SIMT emulator
# (scripts/gpu/emu/emu.h) and compared with the host rule (scripts/gpu/emu/expert_map_check.cpp) on random
# routings, replica tables and spreads. Needs g++ with C++20; takes seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
	echo '#include "emu.h"'
	cat kernels/prelude.cuh kernels/expert_map.cu
} | sed -e 's/extern "C" //' >"$tmp/src.cu"
cp scripts/gpu/emu/emu.h scripts/gpu/emu/expert_map_check.cpp "$tmp/"
${CXX:-g++} -std=c++20 -O1 -ffp-contract=off -pthread -Wno-unknown-pragmas -o "$tmp/expert_map_check" "$tmp/expert_map_check.cpp"
"$tmp/expert_map_check"
echo "emu-expert-map: kernels/expert_map.cu ok"
