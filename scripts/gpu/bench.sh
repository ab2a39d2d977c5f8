#!/usr/bin/env bash
# scripts/gpu/bench.sh — GPU benchmarks: tpfleet against HF transformers on the same card, in the same call.
#
#   scripts/gpu/bench.sh          here: build .gpubuild/ (as scripts/gpu/test.sh does)
#   scripts/gpu/bench.sh --run    on the GPU machine: tpfleet bench (Scout-4L and Maverick-4L shapes, random bf16
#                                 weights; decode at batch 1/16/64, prefill 1x2048; TP=1 and, with 2 GPUs, TP=2),
#                                 then scripts/gpu/bench_hf.py (HF 5.17, eager + sdpa) on the same shapes at TP=1;
#                                 JSON lines to $OUT/bench.jsonl, a table last.
#
# With the device tool: run(command="bash scripts/gpu/bench.sh --run", carry=[".gpubuild"], kind="nvidia-h200-x2").
# SHAPES (default "scout maverick"), TPS ("1 2"; empty: no tpfleet run), BATCHES ("1 16 64"), TOKENS (16),
# RUNS (2) and HF (1) adjust a run.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild

if [ "${1:-}" != "--run" ]; then
	exec bash scripts/gpu/test.sh
fi

tmp=$(mktemp -d)
out=${OUT:-$tmp}
jsonl="$out/bench.jsonl"
: >"$jsonl"
gunzip -c "$BUILD/tpfleet.gz" >"$tmp/tpfleet"
chmod +x "$tmp/tpfleet"
export NCCL_NVLS_ENABLE=0
source scripts/gpu/libdirs.sh
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
common="--layers 4 --hidden 5120 --heads 40 --kv-heads 8 --head-dim 128 --intermediate 8192 --vocab 202048"
declare -A shape_flags=([scout]="--experts 16 --moe-step 1" [maverick]="--experts 128 --moe-step 2 --intermediate-mlp 16384")

for shape in ${SHAPES:-scout maverick}; do
	for tp in ${TPS-1 2}; do
		[ "$tp" -le "$gpus" ] || continue
		for batch in ${BATCHES:-1 16 64}; do
			echo "== tpfleet $shape tp $tp batch $batch"
			profile=""
			[ "$batch" != 1 ] || profile=--profile # where a batch-1 step's GPU time goes, per kernel
			timeout -k 10 180 "$tmp/tpfleet" bench --device cuda --tp "$tp" $common ${shape_flags[$shape]} \
				--batch "$batch" --context 128 --prompt 2048 --tokens "${TOKENS:-16}" --runs "${RUNS:-2}" $profile --json \
				2>"$tmp/err" | sed "s/^{/{\"impl\":\"tpfleet\",\"shape\":\"$shape\",/" | tee -a "$jsonl" || tail -5 "$tmp/err"
		done
	done
	if [ "${HF:-1}" = 1 ]; then
		echo "== HF transformers $shape tp 1"
		timeout -k 10 300 python3 scripts/gpu/bench_hf.py --shape "$shape" --layers 4 --batches "$(echo ${BATCHES:-1 16 64} | tr ' ' ,)" \
			--context 128 --prefill 2048 2>"$tmp/hf.err" | grep '^{' | tee -a "$jsonl" || tail -5 "$tmp/hf.err"
	fi
done

echo
echo "== table"
python3 - "$jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'impl':9s} {'shape':9s} {'card':22s} {'tp':>2s} {'batch':>5s} {'decode ms/step':>15s} {'floor ms':>9s} {'prefill 2048 ms':>16s}")
for r in rows:
    if "error" in r:
        print(f"{'hf':9s} {r['shape']:9s} {r['gpu'][:22]:22s} {1:2d} {r['batch']:5d} {r['error'][:60]}")
    elif r.get("impl") == "tpfleet":
        print(f"{'tpfleet':9s} {r['shape']:9s} {r.get('card', '')[:22]:22s} {r['tp']:2d} {r['batch']:5d} {r['decode_ms_per_token']:15.3f} "
              f"{r.get('decode_floor_ms', 0):9.3f} {r['prefill_ms']:16.1f}")
    else:
        ms = r["ms"] if r["what"] == "decode" else float("nan")
        pre = r["ms"] if r["what"] == "prefill" else float("nan")
        print(f"{'hf':9s} {r['shape']:9s} {r['gpu'][:22]:22s} {1:2d} {r['batch']:5d} {ms:15.3f} {r.get('floor_ms', float('nan')):9.3f} {pre:16.1f}")
PY
