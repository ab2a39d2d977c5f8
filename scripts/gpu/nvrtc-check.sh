#!/usr/bin/env bash
# scripts/gpu/nvrtc-check.sh — compile every kernel unit (kernels/units.txt, as kernels.Units) to a cubin
# here, without a GPU, with a host NVRTC: unlike make kernels-check (clang's parse), this runs ptxas, so
# inline PTX (mma, ldmatrix, cp.async, lop3, fma.rn.bf16x2 ...) is checked; the kernels that spill registers
# to local memory are listed last (a spill in a hot loop costs bandwidth), and VERBOSE=1 prints every
# kernel's registers and spills (ptxas -v). Needs a libnvrtc with the sm_90 target (CUDA 11.8+): Debian's
# non-free libnvrtc11.2 package (11.8), a pip wheel's nvidia/cuda_nvrtc/lib, or a toolkit; set
# LIBNVRTC=/path/to/libnvrtc.so.N when it is not found by name. NVRTC 11.8 is older than the GPU
# machine's 13.0: a unit that passes here can still fail there (newer rules), rarely the other way round.
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=${ARCH:-sm_90}
LIBNVRTC=${LIBNVRTC:-}
if [ -z "$LIBNVRTC" ]; then
	# The cache read once into a variable: `ldconfig -p | grep -q` under pipefail fails at random (grep -q
	# exits at the first match and ldconfig dies of SIGPIPE).
	cache=$(ldconfig -p 2>/dev/null || true)
	for l in libnvrtc.so libnvrtc.so.13 libnvrtc.so.12 libnvrtc.so.11.2; do
		if grep -q "^\s*$l " <<<"$cache"; then LIBNVRTC=$l; break; fi
	done
fi
if [ -z "$LIBNVRTC" ]; then
	echo "nvrtc-check: no libnvrtc found (Debian: add the non-free component, apt-get install libnvrtc11.2; or set LIBNVRTC)" >&2
	exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
${CC:-gcc} -O1 -o "$tmp/nvrtc_check" scripts/gpu/nvrtc_check.c -ldl
. scripts/gpu/units.sh
kernel_units
for unit in "${units[@]}"; do
	name=${unit%% *}
	name=${name%.cu}
	{
		cat kernels/prelude.cuh
		for f in $unit; do cat "kernels/$f"; done
	} >"$tmp/$name.cu"
	if ! "$tmp/nvrtc_check" "$tmp/$name.cu" "$ARCH" "$LIBNVRTC" -Xptxas=-v >"$tmp/$name.log" 2>&1; then
		cat "$tmp/$name.log" >&2
		echo "nvrtc-check: unit $unit failed" >&2
		exit 1
	fi
	[ -z "${VERBOSE:-}" ] || cat "$tmp/$name.log"
	# ptxas names the function, then its properties: "N bytes stack frame, S bytes spill stores, L bytes spill loads".
	awk -v unit="$name" '/Function properties for/ {fn = $NF} /bytes spill stores/ && $7 + $11 > 0 {
		printf "  %-28s %-14s %5d B spill stores, %5d B spill loads\n", fn, unit, $7, $11 }' "$tmp/$name.log" >>"$tmp/spills"
done
if [ -s "$tmp/spills" ]; then
	echo "nvrtc-check: functions that spill registers ($ARCH, per thread):"
	cat "$tmp/spills"
fi
echo "nvrtc-check: every unit compiles to an $ARCH cubin with $LIBNVRTC"
