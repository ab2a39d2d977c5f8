#!/usr/bin/env bash
# scripts/gpu/multiproc.sh — --device cuda across processes, on a machine with TP (2) GPUs (no Go needed).
#
#   scripts/gpu/test.sh                 here (Go): build .gpubuild/tpfleet.gz (with the test binaries)
#   bash scripts/gpu/multiproc.sh       on the GPU machine, from the repo root of a copy that carries
#                                       .gpubuild/: unpack tpfleet and run
#     (a) `tpfleet score --device cuda --tp $TP --rank R --rdzv DIR` as TP processes (rank R on GPU R,
#         NCCL through the unique id in the rendezvous directory) against one `--tp 1` process on the
#         fixture's prompt + greedy ids: relative L2 of the logits <= 1e-3 (python3 compares);
#     (b) `tpfleet serve --device cuda --tp $TP` (one worker process per GPU, NCCL id through the embedded
#         etcd) on free loopback ports, `tpfleet generate --addr ... --temperature 0 --json` of the
#         fixture's prompt_ids: the first MAX_TOKENS ids equal golden.json's greedy_ids; then SIGTERM
#         stops serve (exit 0).
#     and print a PASS/FAIL table last. Exit status: 0 all passed, 1 a step failed, 3 fewer than TP GPUs.
#     TP=1 runs the same paths on one GPU (the rendezvous, the worker's backend and group set-up) without
#     NCCL traffic.
#
# With the device tool: run(command="bash scripts/gpu/multiproc.sh", carry=[".gpubuild"], kind="nvidia-h100-x2").
# MODEL (testdata/fixtures/moe-top1), MAX_TOKENS (16), STEP_TIMEOUT (60 s a step) adjust a run. Logs go to
# $OUT when it is set (multiproc.log and every process's output).
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild
MODEL=${MODEL:-testdata/fixtures/moe-top1}
MAX_TOKENS=${MAX_TOKENS:-16}
STEP_TIMEOUT=${STEP_TIMEOUT:-60}
TP=${TP:-2}

if [ ! -f "$BUILD/tpfleet.gz" ]; then
	echo "multiproc.sh: $BUILD/tpfleet.gz not found: build it with scripts/gpu/test.sh where Go is, and carry $BUILD" >&2
	exit 2
fi
tmp=$(mktemp -d)
out=${OUT:-$tmp}
mkdir -p "$out"
log="$out/multiproc.log"
table="$tmp/table"
: >"$table"
bin="$tmp/tpfleet"
gunzip -c "$BUILD/tpfleet.gz" >"$bin"
chmod +x "$bin"

# NCCL from the pip wheel when it is not in a system directory (as scripts/gpu/test.sh).
source scripts/gpu/libdirs.sh
export NCCL_NVLS_ENABLE=0

say() { echo "$*" | tee -a "$log"; }
row() { printf '%s|%s|%s\n' "$1" "$2" "$3" >>"$table"; say "== $1: $2 $3"; }
failed=0
fail() {
	row "$1" FAIL "$2"
	failed=1
}
# show NAME FILE: the tail of a process's output, into the log.
show() { say "-- $1 (last 40 lines of $2)"; tail -n 40 "$2" | tee -a "$log"; }
elapsed() { echo "$(($(date +%s%N) / 1000000 - $1))ms"; }
now() { echo $(($(date +%s%N) / 1000000)); }

print_table() {
	echo
	echo "== multiproc (card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) x$gpus, $(date -u +%FT%TZ))"
	awk -F'|' '{ printf "%-34s %-5s %s\n", $1, $2, $3 }' "$table"
	[ "$out" = "$tmp" ] || cp "$table" "$out/multiproc-table.txt"
}

serve_pid=
cleanup() {
	if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
		kill -KILL -- "-$serve_pid" 2>/dev/null || kill -KILL "$serve_pid" 2>/dev/null
	fi
}
trap cleanup EXIT

say "== $(date -u +%FT%TZ) $(hostname) tpfleet multiproc, model $MODEL"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
say "TPFLEET_LIB_DIRS=${TPFLEET_LIB_DIRS:-} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"
if [ "${gpus:-0}" -lt "$TP" ]; then
	row "GPUs" SKIP "$gpus visible; TP=$TP needs $TP"
	print_table
	exit 3
fi
row "GPUs" PASS "$gpus visible"

# The fixture's prompt and HF's greedy continuation.
read -r prompt greedy < <(python3 - "$MODEL/golden.json" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
print(",".join(map(str, g["prompt_ids"])), ",".join(map(str, g["greedy_ids"])))
PY
)
if [ -z "${prompt:-}" ] || [ -z "${greedy:-}" ]; then
	fail "golden.json" "no prompt_ids/greedy_ids in $MODEL/golden.json"
	print_table
	exit 1
fi
ids="$prompt,$greedy"

# (a) score: one process at TP 1 (it also fills the kernel cache), then TP rank processes.
t0=$(now)
if timeout -k 10 "$STEP_TIMEOUT" "$bin" score --model "$MODEL" --device cuda --ids "$ids" --out "$tmp/tp1.safetensors" >"$out/score-tp1.log" 2>&1; then
	row "score --tp 1 (1 process)" PASS "$(elapsed "$t0")"
else
	fail "score --tp 1 (1 process)" "exit $? (timeout: 124)"
	show "score tp1" "$out/score-tp1.log"
fi

t0=$(now)
rdzv="$tmp/rdzv"
pids=()
ranks=$(seq 0 $((TP - 1)))
for r in $ranks; do
	timeout -k 10 "$STEP_TIMEOUT" "$bin" score --model "$MODEL" --device cuda --tp "$TP" --rank "$r" --rdzv "$rdzv" \
		--op-timeout "$((STEP_TIMEOUT - 10))s" --ids "$ids" --out "$tmp/tpN.safetensors" >"$out/score-rank$r.log" 2>&1 &
	pids+=($!)
done
st=0
for r in $ranks; do
	wait "${pids[$r]}" || { s=$?; [ "$st" != 0 ] || st=$s; show "score rank $r" "$out/score-rank$r.log"; }
done
if [ "$st" = 0 ]; then
	row "score --tp $TP --rank R ($TP procs)" PASS "$(elapsed "$t0"), rendezvous in $rdzv"
else
	fail "score --tp $TP --rank R ($TP procs)" "exit $st (timeout: 124)"
fi

if [ -f "$tmp/tp1.safetensors" ] && [ -f "$tmp/tpN.safetensors" ]; then
	if res=$(python3 - "$tmp/tpN.safetensors" "$tmp/tp1.safetensors" <<'PY'
import array, json, math, struct, sys

def logits(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        t = json.loads(f.read(n))["logits"]
        assert t["dtype"] == "F32", t["dtype"]
        lo, hi = t["data_offsets"]
        f.seek(8 + n + lo)
        a = array.array("f")
        a.frombytes(f.read(hi - lo))
        return a, t["shape"]

got, shape = logits(sys.argv[1])
want, wshape = logits(sys.argv[2])
if shape != wshape:
    print("shape %s vs %s" % (shape, wshape))
    sys.exit(1)
num = sum((g - w) ** 2 for g, w in zip(got, want))
den = sum(w * w for w in want)
rel = math.sqrt(num / den)
maxd = max(abs(g - w) for g, w in zip(got, want))
vocab = shape[-1]
rows = len(want) // vocab
top = sum(
    max(range(vocab), key=lambda i: got[r * vocab + i]) == max(range(vocab), key=lambda i: want[r * vocab + i])
    for r in range(rows))
ok = rel <= 1e-3
print("relL2 %.2e (<= 1e-3), max abs diff %.2e, top-1 %d/%d, shape %s" % (rel, maxd, top, rows, shape))
sys.exit(0 if ok else 1)
PY
	); then
		row "logits tp$TP vs tp1" PASS "$res"
	else
		fail "logits tp$TP vs tp1" "${res:-comparison failed}"
	fi
else
	fail "logits tp$TP vs tp1" "no logits to compare"
fi

# (b) serve --device cuda --tp TP: TP worker processes, one a GPU; a greedy generation through it.
t0=$(now)
setsid "$bin" serve --model "$MODEL" --device cuda --tp "$TP" --workers "$TP" --listen 127.0.0.1:0 --http-listen "" \
	--etcd-listen 127.0.0.1:0 >"$tmp/serve.out" 2>"$out/serve.log" &
serve_pid=$!
addr=
for _ in $(seq $((STEP_TIMEOUT * 10))); do
	addr=$(head -n 1 "$tmp/serve.out" 2>/dev/null || true)
	[ -z "$addr" ] && kill -0 "$serve_pid" 2>/dev/null || break
	sleep 0.1
done
if [ -z "$addr" ]; then
	fail "serve --device cuda --tp $TP" "no address within ${STEP_TIMEOUT}s (serve $(kill -0 "$serve_pid" 2>/dev/null && echo running || echo exited))"
	show "serve" "$out/serve.log"
else
	row "serve --device cuda --tp $TP" PASS "coordinator at $addr after $(elapsed "$t0")"
	t0=$(now)
	if timeout -k 10 "$((STEP_TIMEOUT + 10))" "$bin" generate --addr "$addr" --ids "$prompt" --max-tokens "$MAX_TOKENS" --temperature 0 \
		--ignore-eos --json --wait "${STEP_TIMEOUT}s" >"$tmp/generate.json" 2>"$out/generate.log"; then
		if res=$(python3 - "$tmp/generate.json" "$greedy" "$MAX_TOKENS" <<'PY'
import json, sys
got = json.loads(open(sys.argv[1]).read())["ids"]
want = [int(x) for x in sys.argv[2].split(",")][: int(sys.argv[3])]
same = 0
while same < min(len(got), len(want)) and got[same] == want[same]:
    same += 1
print("%d/%d ids equal golden greedy_ids%s" % (same, len(want), "" if got == want else "; got %s, want %s" % (got, want)))
sys.exit(0 if got == want else 1)
PY
		); then
			row "generate --addr (greedy)" PASS "$res, $(elapsed "$t0")"
		else
			fail "generate --addr (greedy)" "${res:-bad output: $(head -c 200 "$tmp/generate.json")}"
		fi
	else
		fail "generate --addr (greedy)" "exit $? (timeout: 124)"
		show "generate" "$out/generate.log"
		show "serve" "$out/serve.log"
	fi
	cp "$tmp/generate.json" "$out/" 2>/dev/null || true
fi
# Stop serve: SIGTERM, up to 30 s for a clean exit 0 (its workers stop with it).
if kill -0 "$serve_pid" 2>/dev/null; then
	t0=$(now)
	kill -TERM "$serve_pid"
	for _ in $(seq 300); do
		kill -0 "$serve_pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$serve_pid" 2>/dev/null; then
		fail "serve stop (SIGTERM)" "still running after 30s; killed"
		cleanup
		wait "$serve_pid" 2>/dev/null
	elif wait "$serve_pid"; then
		row "serve stop (SIGTERM)" PASS "exit 0 after $(elapsed "$t0")"
	else
		fail "serve stop (SIGTERM)" "exit $?"
		show "serve" "$out/serve.log"
	fi
fi
serve_pid=
if grep -q "panic" "$out/serve.log" 2>/dev/null; then
	fail "serve log" "a panic in $out/serve.log"
	show "serve" "$out/serve.log"
fi

print_table
exit "$failed"
