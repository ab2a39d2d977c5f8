#!/usr/bin/env bash
# scripts/gpu/pdl_ab.sh — programmatic dependent launch on and off (TPFLEET_CUDA_PDL=1/0), Scout-4L decode at
# batch 1, 16 and 64 and a 2048-token prefill, one binary, one card, one call; about a minute on an H100
# (plus the kernels' compile when the kernel cache is cold).
#
#   scripts/gpu/pdl_ab.sh --run [BIN.gz]   on the GPU machine (BIN.gz defaults to .gpubuild/tpfleet.gz, built
#                                          here by scripts/gpu/test.sh): for each batch, `tpfleet bench --device
#                                          cuda` (Scout-4L shape, random bf16 weights, CUDA graphs) with PDL on
#                                          and then off, alternated; JSON lines to $OUT/pdl_ab.jsonl; a table last
#                                          (ms/step, fraction of the routed-experts floor, prefill)
#
# UNFUSE=1 adds a third column: PDL on, every kernel fusion off (TPFLEET_CUDA_UNFUSE=all), the unfused
# baseline (about 40 s more). UNFUSE=act,combine (any list of cuda.Fusions()) turns off only those there.
# SIDES="on unfused" runs only those columns (a shorter call). BASE_UNFUSE=act,combine turns those fusions
# off on every side (a fusion known to be wrong kept out of the comparison). QUANT=fp8 or QUANT=int4 quantises the weights at load (bench --quantization; e.g. UNFUSE=q4gemm QUANT=int4).
# TOKENS (decode steps, 32) and RUNS (best of, 2) as for bench.
# With the device tool: run(command="bash scripts/gpu/pdl_ab.sh --run", carry=[".gpubuild"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "${1:-}" = --run ] || { echo "usage: $0 --run [tpfleet.gz]" >&2; exit 2; }
src=${2:-.gpubuild/tpfleet.gz}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=${OUT:-$tmp}
jsonl="$out/pdl_ab.jsonl"
: >"$jsonl"
gunzip -c "$src" >"$tmp/tpfleet"
chmod +x "$tmp/tpfleet"
export NCCL_NVLS_ENABLE=0
sides="on off"
unfuse=${UNFUSE:-}
[ "$unfuse" = 1 ] && unfuse=all
[ -n "$unfuse" ] && sides="on off unfused"
[ -z "${SIDES:-}" ] || sides=$SIDES
quant=()
[ -n "${QUANT:-}" ] && quant=(--quantization "$QUANT")
scout="--layers 4 --hidden 5120 --heads 40 --kv-heads 8 --head-dim 128 --experts 16 --intermediate 8192 --vocab 202048"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for batch in 1 16 64; do
	prompt=16
	[ "$batch" = 1 ] && prompt=2048 # the prefill is timed with the batch-1 runs
	for side in $sides; do
		pdl=1 un=${BASE_UNFUSE:-}
		[ "$side" = off ] && pdl=0
		[ "$side" = unfused ] && un=$unfuse${un:+,$un}
		echo "== batch $batch PDL $side"
		TPFLEET_CUDA_PDL=$pdl TPFLEET_CUDA_UNFUSE=$un timeout -k 10 150 "$tmp/tpfleet" bench --device cuda --tp 1 $scout "${quant[@]}" \
			--batch "$batch" --context 128 --prompt "$prompt" --tokens "${TOKENS:-32}" --runs "${RUNS:-2}" --json 2>"$tmp/err" |
			sed "s/^{/{\"side\":\"$side\",/" | tee -a "$jsonl" | cut -c1-200 || tail -5 "$tmp/err"
	done
done
echo
echo "== table ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); ms/step, % of the decode floor at the steps' routed experts)"
python3 - "$jsonl" "$sides" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
sides = sys.argv[2].split()
get = {(r["side"], r["batch"]): r for r in rows}
label = {"on": "PDL on", "off": "PDL off", "unfused": "PDL on, unfused"}
print(f"{'batch':>5} {'experts/layer':>13} {'floor ms':>8} " + " ".join(f"{label[s]:>18}" for s in sides) + f" {'off/on':>7}")
for b in (1, 16, 64):
    rs = [get.get((s, b)) for s in sides]
    ref = next((r for r in rs if r), None)
    if ref is None:
        print(f"{b:>5} no runs")
        continue
    cells = []
    for r in rs:
        cells.append(f"{r['decode_ms_per_token']:8.3f} ({100 * r.get('decode_fraction_of_floor', 0):3.0f} %)" if r else f"{'failed':>18}")
    on, off = get.get(("on", b)), get.get(("off", b))
    ratio = f"{off['decode_ms_per_token'] / on['decode_ms_per_token']:7.3f}" if on and off else f"{'-':>7}"
    print(f"{b:>5} {ref.get('decode_experts_per_moe_layer', 0):13.2f} {ref.get('decode_floor_ms', 0):8.3f} " +
          " ".join(f"{c:>18}" for c in cells) + f" {ratio}")
pre = [(s, get.get((s, 1))) for s in sides]
print("prefill 2048: " + ", ".join(f"{label[s]} {r['prefill_ms']:.2f} ms" for s, r in pre if r))
PY
