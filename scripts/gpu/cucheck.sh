#!/usr/bin/env bash
# scripts/gpu/cucheck.sh — check kernels/*.cu for C++ syntax and type errors here, without a GPU or the
# CUDA toolkit: clang parses the same single compilation unit NVRTC compiles (prelude.cuh, then every
# *.cu in name order) against scripts/gpu/cucheck.h. Inline PTX is not checked (only NVRTC and ptxas
# see it). Needs clang (Debian: apt-get install clang-14).
set -euo pipefail
cd "$(dirname "$0")/../.."
CLANG=${CLANG:-$(command -v clang-14 || command -v clang || true)}
if [ -z "$CLANG" ]; then
	echo "cucheck: clang not found (apt-get install clang-14)" >&2
	exit 2
fi
src=$(mktemp --suffix=.cu)
trap 'rm -f "$src"' EXIT
cat kernels/prelude.cuh $(ls kernels/*.cu | sort) >"$src"
"$CLANG" -x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -fsyntax-only \
	-ferror-limit=0 -Wno-unknown-cuda-version -include scripts/gpu/cucheck.h "$src"
# Each compilation unit (kernels.Units: the files compiled apart, in parallel) must also parse alone: the
# groups of kernels/units.txt, and every other file by itself.
. scripts/gpu/units.sh
kernel_units
for unit in "${units[@]}"; do
	files=""
	for f in $unit; do files="$files kernels/$f"; done
	cat kernels/prelude.cuh $files >"$src"
	"$CLANG" -x cuda --cuda-device-only --cuda-gpu-arch=sm_80 -nocudainc -nocudalib -fsyntax-only \
		-ferror-limit=0 -Wno-unknown-cuda-version -include scripts/gpu/cucheck.h "$src" ||
		{ echo "cucheck: unit$files does not compile alone (add its dependencies to its line of kernels/units.txt)" >&2; exit 1; }
done
echo "cucheck: kernels/*.cu ok (one unit and each of kernels.Units alone)"
