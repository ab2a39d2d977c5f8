#!/usr/bin/env bash
# scripts/gpu/ab.sh — Scout-4L batch-1 decode of two tpfleet binaries on one card in one call, alternated
# (A B A B ...) so that clock and thermal drift fall on both, for "is the new build as fast as the old".
#
#   scripts/gpu/ab.sh --run A.gz B.gz   on the GPU machine: ROUNDS (3) rounds of `tpfleet bench --device cuda`
#                                       (Scout-4L shape, random bf16 weights, CUDA graphs) per binary; JSON
#                                       lines to $OUT/ab.jsonl; a table last with each one's median and B/A
#
# Build A and B here first (go build -ldflags='-s -w' of each commit, gzip), carry them in .gpubuild/.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "${1:-}" = --run ] && [ $# = 3 ] || { echo "usage: $0 --run A.gz B.gz" >&2; exit 2; }
tmp=$(mktemp -d)
out=${OUT:-$tmp}
jsonl="$out/ab.jsonl"
: >"$jsonl"
for side in A B; do
	src=$2
	[ "$side" = A ] || src=$3
	gunzip -c "$src" >"$tmp/$side"
	chmod +x "$tmp/$side"
done
export NCCL_NVLS_ENABLE=0
scout="--layers 4 --hidden 5120 --heads 40 --kv-heads 8 --head-dim 128 --experts 16 --intermediate 8192 --vocab 202048"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for round in $(seq "${ROUNDS:-3}"); do
	for side in A B; do
		echo "== round $round $side"
		timeout -k 10 180 "$tmp/$side" bench --device cuda --tp 1 $scout --batch 1 --prompt 2048 \
			--tokens "${TOKENS:-64}" --runs "${RUNS:-3}" --json 2>"$tmp/err" |
			sed "s/^{/{\"side\":\"$side\",\"round\":$round,/" | tee -a "$jsonl" || tail -5 "$tmp/err"
	done
done
echo
echo "== table (A=$2 B=$3)"
python3 - "$jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
med = {}
for side in "AB":
    d = [r["decode_ms_per_token"] for r in rows if r["side"] == side]
    p = [r["prefill_ms"] for r in rows if r["side"] == side]
    if not d:
        print(side, "no runs"); continue
    med[side] = statistics.median(d)
    print(f"{side}: decode ms/step {' '.join('%.4f' % x for x in d)}  median {med[side]:.4f}  "
          f"floor {rows[0].get('decode_floor_ms', 0):.3f}  prefill 2048 median {statistics.median(p):.2f} ms")
if len(med) == 2:
    print(f"B/A decode = {med['B'] / med['A']:.4f}")
PY
