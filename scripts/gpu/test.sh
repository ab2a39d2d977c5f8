#!/usr/bin/env bash
# scripts/gpu/test.sh — GPU tests in two halves, because the GPU machine has no Go toolchain.
#
#   scripts/gpu/test.sh              here: build the GPU packages' test binaries (go test -c, cgo, stripped)
#                                    into .gpubuild/ (git-ignored) and gzip them
#   BENCH=1 scripts/gpu/test.sh --run  also benches Scout-4L (tpfleet bench --device cuda) at TP=1 and,
#                                    with 2 GPUs, TP=2, and adds them to the table; at TP=1 (graphs) also
#                                    with the weights in each of $BENCH_QUANT (default "fp8 int4")
#   scripts/gpu/test.sh --run [ARGS] on the GPU machine, from a copy of the repo that carries .gpubuild/:
#                                    unpack and run every binary from the repo root with -test.v (ARGS are
#                                    passed on, e.g. -test.run=TestGolden), then print a table
#                                    (op/fixture | shape | error | time) last
#
# With the device tool: run(command="bash scripts/gpu/test.sh --run", carry=[".gpubuild"]).
# Logs also go to $OUT when it is set. Exit status: non-zero when any binary failed, or, on a machine
# with a GPU (nvidia-smi -L lists one), when a binary ran no test or skipped them all: GPU tests skip
# only where there is no GPU (internal/gputest), so a GPU run that tests nothing is a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild
PKGS=(backend/cuda comm/nccl)

build() {
	mkdir -p "$BUILD"
	rm -f "$BUILD"/*.test.gz
	for pkg in "${PKGS[@]}"; do
		name=${pkg//\//_}
		CGO_ENABLED=1 go test -c -ldflags='-s -w' -o "$BUILD/$name.test" "./$pkg"
		gzip -9 -f "$BUILD/$name.test"
	done
	CGO_ENABLED=1 go build -ldflags='-s -w' -o "$BUILD/tpfleet" ./cmd/tpfleet
	gzip -9 -f "$BUILD/tpfleet"
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
	# NCCL from the pip wheel when it is not in a system directory.
	source scripts/gpu/libdirs.sh
	export NCCL_NVLS_ENABLE=0
	local gpus
	gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
	local nbin=0
	shopt -s nullglob
	for gz in "$BUILD"/*.test.gz; do
		nbin=$((nbin + 1))
		bin="$tmp/$(basename "$gz" .gz)"
		gunzip -c "$gz" >"$bin"
		chmod +x "$bin"
		echo "== $bin $*" | tee -a "$log"
		: >"$tmp/bin.out"
		set +e
		"$bin" -test.v -test.count=1 -test.timeout="${TEST_TIMEOUT:-540s}" "$@" 2>&1 | grep --line-buffered -v '^=== \(RUN\|PAUSE\|CONT\)' | tee -a "$log" "$tmp/bin.out"
		st=${PIPESTATUS[0]}
		set -e
		echo "== exit $st" | tee -a "$log"
		[ "$st" = 0 ] || rc=$st
		local passed skipped
		passed=$(grep -c -- '--- PASS: ' "$tmp/bin.out" || true)
		skipped=$(grep -c -- '--- SKIP: ' "$tmp/bin.out" || true)
		echo "== $(basename "$bin"): $passed passed, $skipped skipped" | tee -a "$log"
		if [ "$gpus" -gt 0 ] && [ "$passed" -eq 0 ]; then
			echo "== FAIL: $(basename "$bin") passed no test on a machine with $gpus GPU(s)" | tee -a "$log"
			[ "$rc" != 0 ] || rc=1
		fi
	done
	if [ "$nbin" -eq 0 ]; then
		echo "== FAIL: no test binary in $BUILD (run scripts/gpu/test.sh here first)" | tee -a "$log"
		rc=1
	fi
	if [ -n "${BENCH:-}" ] && [ -f "$BUILD/tpfleet.gz" ]; then
		gunzip -c "$BUILD/tpfleet.gz" >"$tmp/tpfleet"
		chmod +x "$tmp/tpfleet"
		local gpus scout maverick tp
		gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
		scout="--layers 4 --hidden 5120 --heads 40 --kv-heads 8 --head-dim 128 --experts 16 --intermediate 8192 --vocab 202048"
		local runs=() q
		for tp in 1 2 4 8; do
			[ "$tp" -le "$gpus" ] || continue
			runs+=("$tp graphs none")
			[ "$tp" != 1 ] || runs+=("1 eager none")
		done
		for q in ${BENCH_QUANT-fp8 int4}; do runs+=("1 graphs $q"); done
		local run mode
		for run in "${runs[@]}"; do
			read -r tp mode q <<<"$run"
			echo "== bench Scout-4L tp $tp $mode quantization $q" | tee -a "$log"
			set +e
			TPFLEET_CUDA_GRAPHS=$([ "$mode" = graphs ] && echo 1 || echo 0) timeout -k 10 "${BENCH_TIMEOUT:-120}" "$tmp/tpfleet" bench --device cuda --tp "$tp" $scout \
				--quantization "$q" --prompt 2048 --tokens "${BENCH_TOKENS:-32}" --runs "${BENCH_RUNS:-3}" --profile --json 2>&1 | tee -a "$log" "$tmp/bench.json"
			st=${PIPESTATUS[0]}
			set -e
			[ "$st" = 0 ] || rc=$st
			label="$tp $mode"
			[ "$q" = none ] || label="$label $q"
			python3 - "$tmp/bench.json" "$label" >>"$table" <<'PY' || true
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        print("bench Scout-4L|tp %s %s|decode %.3f ms/step (floor %.3f ms = %.2f GB at %.0f GB/s, %.0f%%)|prefill %d: %.1f ms, load %.0f ms" % (
            sys.argv[2], r.get("card", ""), r["decode_ms_per_token"], r.get("decode_floor_ms", 0), r["decode_weight_bytes_per_step"] / 1e9,
            r.get("copy_gb_per_s", 0), 100 * r.get("decode_fraction_of_floor", 0), r["prompt_tokens"], r["prefill_ms"], r["load_ms"]))
        for kind in ("decode", "prefill"):
            rows = r.get("profile_" + kind) or []
            print("profile %s|tp %s, eager, GPU %.3f ms|%s|" % (kind, sys.argv[2], r.get("profile_%s_gpu_ms" % kind, 0),
                "; ".join("%s %.3f ms x%.0f" % (x["op"][:28], x["ms"], x["calls"]) for x in rows[:8])))
        for g in r.get("graphs") or []:
            print("graphs|%s|steps %d replays %d captures %d eager %s|" % (g["key"], g["steps"], g["replays"], g["captures"], g["eager"]))
PY
			: >"$tmp/bench.json"
		done
	fi
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
