#!/usr/bin/env bash
# scripts/gpu/ncu.sh — Nsight Compute counters of the decode kernels that miss the bandwidth floor, in a
# short Scout-4L `tpfleet bench` (random weights, quant_bench.sh's shapes): per kernel launch shape, the
# duration, DRAM throughput (% of peak), achieved occupancy, registers per thread and the top two warp
# stall reasons, so that one device call says why a kernel is slow rather than only that it is.
#
#   bash scripts/gpu/ncu.sh          here: build .gpubuild/ (as scripts/gpu/test.sh does)
#   bash scripts/gpu/ncu.sh --run    on the GPU machine (no Go there), from a copy carrying .gpubuild/: ncu
#                                    (--clock-control none: the clocks are left alone) on one bench run;
#                                    the report to $OUT/ncu-<quant>-b<batch>.ncu-rep, its details page as
#                                    CSV to $OUT/ncu-<quant>-b<batch>.csv, ncu's and the bench's output to
#                                    .log beside them, and a table last (scripts/gpu/ncu_table.py)
#
# With the device tool: run(command="bash scripts/gpu/ncu.sh --run", carry=[".gpubuild"]); or as steps of
# one call: bash scripts/gpu/session.sh 'ncu=bash scripts/gpu/ncu.sh --run' 'ncuq4=QUANT=int4 bash scripts/gpu/ncu.sh --run'.
# Expected to take about a minute a run (the bench's start, a 2048-token prefill, the profiled launches'
# replays); not yet timed on a GPU.
#
# QUANT (bf16; fp8, int4) and BATCH (1) pick the bench: batch 1 decodes after a 2048-token prompt (the
# decode attention reads 2 k keys), larger batches decode sequences of CONTEXT (128) cached tokens, as in
# quant_bench.sh; TOKENS (8) decode steps, one run. KERNELS is the --kernel-name regex, matched anywhere in
# the name (default below: bf16's gemv_split/gemv_multi, the int4 and fp8 GEMVs and expert GEMVs,
# attention_decode; not bf16's experts, expert_gemv_*, nor the lm_head's gemv_N). SKIP (20) matching
# launches are skipped (about the first decode step at bf16; the prefill's GEMMs do not match) and COUNT
# (12) are profiled.
# LIMIT (240 s) bounds ncu. GRAPHS (0) sets TPFLEET_CUDA_GRAPHS: with CUDA graphs off every kernel is a
# plain launch, so ncu names each one in order; GRAPHS=1 profiles the replayed graphs' kernel nodes
# (--graph-profiling node). NCU names the ncu binary when it is not on the PATH.
#
# What the counters are: each profiled kernel runs alone, replayed once for each pass, with the caches
# flushed before each pass (ncu's --cache-control all) and no overlap with its neighbours (programmatic
# dependent launch gains nothing there, and the `prefetch` fusion's weights are no longer in L2), so
# durations are a kernel's own; the bench's own timings in the .log are not comparable with other runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild

if [ "${1:-}" != "--run" ]; then
	exec bash scripts/gpu/test.sh
fi

quant=${QUANT:-bf16}
batch=${BATCH:-1}
kernels=${KERNELS:-q4gemv|q4expert_gemv|fp8_gemv|fp8_expert_gemv|attention_decode|gemv_split|gemv_multi}
tmp=$(mktemp -d)
out=${OUT:-$tmp}
name="ncu-$quant-b$batch"
gunzip -c "$BUILD/tpfleet.gz" >"$tmp/tpfleet" || { echo "no $BUILD/tpfleet.gz: run bash scripts/gpu/test.sh here first" >&2; exit 2; }
chmod +x "$tmp/tpfleet"
source scripts/gpu/libdirs.sh

ncu=${NCU:-$(command -v ncu || true)}
if [ -z "$ncu" ]; then
	for c in /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu; do
		[ ! -x "$c" ] || ncu=$c
	done
fi
[ -n "$ncu" ] || { echo "no ncu on this machine (set NCU)" >&2; exit 2; }
echo "== $("$ncu" --version | tail -1) ($ncu); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"

scout=(--layers 4 --hidden 5120 --heads 40 --kv-heads 8 --head-dim 128 --experts 16 --moe-step 1 --intermediate 8192 --vocab 202048)
prompt=128
[ "$batch" != 1 ] || prompt=2048 # quant_bench.sh's batch-1 run: decode reads 2 k keys
bench=("$tmp/tpfleet" bench --device cuda --tp 1 "${scout[@]}" --quantization "$quant" --batch "$batch"
	--context "${CONTEXT:-128}" --prompt "$prompt" --tokens "${TOKENS:-8}" --runs 1 --json)
# Sections as named by ncu --list-sections; the stall metrics (cycles per issued instruction by reason) go
# into the details page's "Command line profiler metrics" rows, which ncu_table.py reads.
profile=(--clock-control none --target-processes all --graph-profiling node
	--kernel-name "regex:$kernels" --launch-skip "${SKIP:-20}" --launch-count "${COUNT:-12}"
	--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis
	--metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
	--export "$out/$name" --force-overwrite)

echo "== $name: TPFLEET_CUDA_GRAPHS=${GRAPHS:-0} ncu ${profile[*]} ${bench[*]}"
rc=0
TPFLEET_CUDA_GRAPHS=${GRAPHS:-0} timeout -k 10 "${LIMIT:-240}" "$ncu" "${profile[@]}" "${bench[@]}" >"$out/$name.log" 2>&1 || rc=$?
grep '^{' "$out/$name.log" | cut -c1-300 || true # the bench's JSON line
grep '^==' "$out/$name.log" | grep -v '^==PROF== Profiling' | tail -15 || true
[ "$rc" = 0 ] || { echo "== ncu exit $rc (124: past LIMIT=${LIMIT:-240} s); the log's end:"; tail -20 "$out/$name.log"; }
if [ ! -f "$out/$name.ncu-rep" ]; then
	echo "== no report: nothing profiled"
	exit $((rc == 0 ? 1 : rc))
fi
"$ncu" --import "$out/$name.ncu-rep" --csv --page details >"$out/$name.csv"
echo
python3 scripts/gpu/ncu_table.py "$out/$name.csv" || { [ "$rc" != 0 ] || rc=1; }
exit "$rc"
