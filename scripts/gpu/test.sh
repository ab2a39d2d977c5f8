#!/usr/bin/env bash
# scripts/gpu/test.sh — GPU tests in two halves, because the GPU machine has no Go toolchain.
#
#   scripts/gpu/test.sh              here: build the GPU packages' test binaries (go test -c, cgo, stripped)
#                                    into .gpubuild/ (git-ignored) and gzip them
#   scripts/gpu/test.sh --run [ARGS] on the GPU machine, from a copy of the repo that carries .gpubuild/:
#                                    unpack and run every binary from the repo root with -test.v (ARGS are
#                                    passed on, e.g. -test.run=TestGolden), then print a table
#                                    (op/fixture | shape | error | time) last
#
# With the device tool: run(command="bash scripts/gpu/test.sh --run", carry=[".gpubuild"]).
# Logs also go to $OUT when it is set. Exit status: non-zero when any binary failed.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild
PKGS=(backend/cuda)

build() {
	mkdir -p "$BUILD"
	rm -f "$BUILD"/*.test.gz
	for pkg in "${PKGS[@]}"; do
		name=${pkg//\//_}
		CGO_ENABLED=1 go test -c -ldflags='-s -w' -o "$BUILD/$name.test" "./$pkg"
		gzip -9 -f "$BUILD/$name.test"
	done
	ls -l "$BUILD"
	du -sh "$BUILD"
}

run() {
	local tmp rc=0 table
	tmp=$(mktemp -d)
	table="$tmp/table"
	: >"$table"
	export TPFLEET_GPU_TABLE="$table"
	local log=${OUT:+$OUT/gpu-test.log}
	log=${log:-$tmp/gpu-test.log}
	{
		echo "== $(date -u +%FT%TZ) $(hostname)"
		nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || true
	} | tee "$log"
	for gz in "$BUILD"/*.test.gz; do
		bin="$tmp/$(basename "$gz" .gz)"
		gunzip -c "$gz" >"$bin"
		chmod +x "$bin"
		echo "== $bin $*" | tee -a "$log"
		set +e
		"$bin" -test.v -test.count=1 -test.timeout=540s "$@" 2>&1 | grep -v '^=== \(RUN\|PAUSE\|CONT\)' | tee -a "$log"
		st=${PIPESTATUS[0]}
		set -e
		echo "== exit $st" | tee -a "$log"
		[ "$st" = 0 ] || rc=$st
	done
	[ -n "${OUT:-}" ] && cp "$table" "$OUT/gpu-table.txt"
	echo
	echo "== table (card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
	awk -F'|' '{ printf "%-12s %-42s %-48s %s\n", $1, $2, $3, $4 }' "$table"
	return $rc
}

case "${1:-}" in
--run)
	shift
	run "$@"
	;;
"")
	build
	;;
*)
	echo "usage: $0 [--run [test flags]]" >&2
	exit 2
	;;
esac
