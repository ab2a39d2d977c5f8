#!/usr/bin/env bash
# scripts/gpu/scout-full.sh — full-size Llama 4 Scout (testdata/configs/scout, 48 layers, 16 experts) with
# generated weights (--load-format dummy) on one GPU: the memory planner's numbers and the step times at
# full size (issue 12).
#
#   scripts/gpu/scout-full.sh          here: build .gpubuild/ (as scripts/gpu/test.sh does)
#   scripts/gpu/scout-full.sh --run    on the GPU machine: for each format of FORMATS (default "int4"; fp8 needs
#                                      about 103 GiB of weights: an H200), tpfleet bench --config scout: decode at
#                                      batch 1/16/64 with 4096 cached tokens, prefill 8192, decode after a
#                                      131072-token prefill; then tpfleet serve --load-format dummy on GPU 0 with
#                                      its start-up log by phase, the worker's memory plan (cluster memory) and a
#                                      request beyond the planner's longest context (refused with the numbers).
#                                      JSON lines to $OUT/scout.jsonl, logs to $OUT/serve-<format>.log.
#
# With the device tool: run(command="bash scripts/gpu/scout-full.sh --run", carry=[".gpubuild"]) (int4, H100
# or H200); FORMATS="int4 fp8" with needs_h200. LONG=0 skips the 131072-token prefill (run in pieces of
# 8192); BATCHES (default "1 16 64") the decode batches.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild

if [ "${1:-}" != "--run" ]; then
	exec bash scripts/gpu/test.sh
fi

tmp=$(mktemp -d)
out=${OUT:-$tmp}
jsonl="$out/scout.jsonl"
: >"$jsonl"
gunzip -c "$BUILD/tpfleet.gz" >"$tmp/tpfleet"
chmod +x "$tmp/tpfleet"
tp="$tmp/tpfleet"
source scripts/gpu/libdirs.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
cfg=testdata/configs/scout

bench() { # name, then bench flags
	local name=$1
	shift
	echo "== $name"
	timeout -k 10 400 "$tp" bench --device cuda --config "$cfg" --json "$@" 2>"$tmp/err" |
		sed "s/^{/{\"run\":\"$name\",/" | tee -a "$jsonl" || tail -5 "$tmp/err"
}

for q in ${FORMATS:-int4}; do
	for batch in ${BATCHES:-1 16 64}; do # 64 sequences of 4096 tokens hold 48 GiB of KV: on an H100 with int4 Scout it does not fit
		bench "$q decode b$batch ctx4096" --quantization "$q" --batch "$batch" --context 4096 --prompt 4096 --tokens 16 --runs 2
	done
	bench "$q prefill 8192" --quantization "$q" --prompt 8192 --tokens 2 --runs 2
	if [ "${LONG:-1}" = 1 ]; then
		bench "$q decode b1 ctx131072" --quantization "$q" --prompt 131072 --prefill-chunk 8192 --tokens 8 --runs 1
	fi

	echo "== $q serve --load-format dummy (start-up by phase)"
	log="$out/serve-$q.log"
	start=$(date +%s.%N)
	"$tp" serve "$cfg" --load-format dummy --device cuda --workers 1 --quantization "$q" --etcd-listen 127.0.0.1:23790 \
		--listen 127.0.0.1:7070 --http-listen 127.0.0.1:8000 >"$tmp/addr" 2>"$log" &
	pid=$!
	ok=0
	for _ in $(seq 600); do
		if "$tp" cluster memory --etcd http://127.0.0.1:23790 --json 2>/dev/null | grep '"kv_blocks"' >/dev/null; then
			ok=1
			break
		fi
		kill -0 "$pid" 2>/dev/null || break
		sleep 1
	done
	echo "ready=$ok after $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
	grep -E 'serve started|loading weights|weights loaded|memory plan|group serving|serving\b' "$log" | cut -c1-400 || true
	sed -n '/memory plan (rank/,/budget/p' "$log"
	"$tp" cluster memory --etcd http://127.0.0.1:23790 || true
	"$tp" generate --addr 127.0.0.1:7070 --ids 200000,1,2,3,4,5,6,7 --max-tokens 16 --temperature 0 --ignore-eos --json || true
	"$tp" generate --addr 127.0.0.1:7070 --ids 200000,1,2,3 --max-tokens 5000000 --temperature 0 --json || true # refused: KV capacity
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
done

echo
echo "== table"
python3 - "$jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'run':28} {'card':24} {'format':10} {'load s':>7} {'prefill ms':>11} {'decode ms/step':>15} {'tok/s':>9} {'KV blocks':>10} {'longest':>9}")
for r in rows:
    m = r.get("memory") or {}
    print(f"{r['run']:28} {r.get('card','')[:24]:24} {r['format']:10} {r['load_ms']/1e3:7.1f} {r['prefill_ms']:11.1f} "
          f"{r['decode_ms_per_token']:15.3f} {r['decode_tokens_per_second']:9.1f} {m.get('kv_blocks', 0):10} {m.get('longest_context', 0):9}")
PY
