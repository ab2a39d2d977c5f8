#!/usr/bin/env bash
# scripts/gpu/variants.sh — backend/cuda's GPU tests matching a pattern, run once under each environment
# setting, so that one device call tells which switch (PDL, a fusion) a failure follows.
#
#   bash scripts/gpu/test.sh                          here: build .gpubuild/
#   bash scripts/gpu/variants.sh PATTERN VAR=VALUE ... on the GPU machine: -test.run PATTERN once per VAR=VALUE
#                                                     (e.g. TPFLEET_CUDA_PDL=0, TPFLEET_CUDA_UNFUSE=route;
#                                                     BASELINE=1 for the defaults); a table of exits last
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { echo "usage: $0 PATTERN VAR=VALUE ..." >&2; exit 2; }
pattern=$1
shift
tmp=$(mktemp -d)
out=${OUT:-$tmp}
gunzip -c .gpubuild/backend_cuda.test.gz >"$tmp/cuda.test"
chmod +x "$tmp/cuda.test"
source scripts/gpu/libdirs.sh
summary=$tmp/summary
: >"$summary"
rc=0
for setting in "$@"; do
	echo "== $setting: -test.run '$pattern'" | tee -a "$out/variants.log"
	env "$setting" "$tmp/cuda.test" -test.v -test.count=1 -test.timeout=300s -test.run "$pattern" 2>&1 |
		grep --line-buffered -v '^=== \(RUN\|PAUSE\|CONT\)' | tee -a "$out/variants.log" | cut -c1-300
	st=${PIPESTATUS[0]}
	[ "$st" = 0 ] || rc=$st
	printf '%-40s exit %s  %s\n' "$setting" "$st" "$(grep -c -- '--- FAIL' "$out/variants.log")" >>"$summary"
done
echo
echo "== variants (exit, failures so far in the log)"
cat "$summary"
exit "$rc"
