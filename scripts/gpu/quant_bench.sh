#!/usr/bin/env bash
# scripts/gpu/quant_bench.sh — issue 11's GPU benchmarks in one device call: Scout-4L (random weights) decode at
# batch 1/16/64 and prefill 2048 in bf16, fp8 and int4, the expert-offload run, and HF transformers at its best mode
# (scripts/gpu/bench_hf.py) on the same card. JSON lines to $OUT/quant_bench.jsonl, a table last with each run's
# bandwidth floor (the weight bytes the step reads in their stored formats, lm_head bf16, / the measured copy rate)
# and the fraction of it reached.
#
#   bash scripts/gpu/test.sh                  here: build .gpubuild/ (tpfleet.gz among it)
#   bash scripts/gpu/quant_bench.sh           on the GPU machine (no Go there), from a copy carrying .gpubuild/
#
# With the device tool: run(command="bash scripts/gpu/quant_bench.sh", carry=[".gpubuild"]). About 4-5 minutes
# on an H100. FORMATS (default "bf16 fp8 int4"), BATCHES ("1 16 64"), TOKENS (16), RUNS (2), HF (1), OFFLOAD (1)
# adjust a run; BENCH_TIMEOUT (45 s) bounds a tpfleet run, BUDGET (420 s) is when the remaining tpfleet runs are
# skipped so that HF and the table fit the device call's 600 s.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild
tmp=$(mktemp -d)
out=${OUT:-$tmp}
jsonl="$out/quant_bench.jsonl"
: >"$jsonl"
gunzip -c "$BUILD/tpfleet.gz" >"$tmp/tpfleet" || { echo "no $BUILD/tpfleet.gz: run bash scripts/gpu/test.sh here first" >&2; exit 2; }
chmod +x "$tmp/tpfleet"
source scripts/gpu/libdirs.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
scout="--layers 4 --hidden 5120 --heads 40 --kv-heads 8 --head-dim 128 --experts 16 --moe-step 1 --intermediate 8192 --vocab 202048"
rc=0

# bench QUANT BATCH [extra flags...]: one tpfleet bench run, its JSON line tagged and appended to $jsonl.
bench() {
	local q=$1 batch=$2
	shift 2
	if [ "$SECONDS" -gt "${BUDGET:-420}" ]; then # leave the HF run and the table their time (a device call ends at 600 s)
		echo "== skipped tpfleet Scout-4L $q batch $batch $*: past ${BUDGET:-420} s"
		return
	fi
	local prompt=128 profile=""
	if [ "$batch" = 1 ]; then
		prompt=2048 # the prefill 2048 figure comes from the batch-1 run
		profile=--profile
	fi
	echo "== tpfleet Scout-4L $q batch $batch $*"
	timeout -k 10 "${BENCH_TIMEOUT:-45}" "$tmp/tpfleet" bench --device cuda --tp 1 $scout --quantization "$q" \
		--batch "$batch" --context 128 --prompt "$prompt" --tokens "${TOKENS:-16}" --runs "${RUNS:-2}" $profile --json "$@" \
		2>"$tmp/err" | sed "s/^{/{\"impl\":\"tpfleet\",\"shape\":\"scout\",/" | tee -a "$jsonl" | cut -c1-400
	local st=${PIPESTATUS[0]}
	if [ "$st" != 0 ]; then
		tail -5 "$tmp/err"
		rc=$st
	fi
}

for q in ${FORMATS:-bf16 fp8 int4}; do
	for batch in ${BATCHES:-1 16 64}; do
		bench "$q" "$batch"
	done
done

if [ "${OFFLOAD:-1}" = 1 ]; then
	if "$tmp/tpfleet" bench -h 2>&1 | grep -- '-offload-experts' >/dev/null; then
		for q in bf16 fp8; do bench "$q" 1 --offload-experts; done
	else
		echo "== offload: this tpfleet has no bench --offload-experts (not built yet)"
	fi
fi

if [ "${HF:-1}" = 1 ]; then
	echo "== HF transformers Scout-4L (best SDPA backend by measurement, hand loop)"
	hf_limit=$((560 - SECONDS))
	[ "$hf_limit" -le "${HF_TIMEOUT:-200}" ] || hf_limit=${HF_TIMEOUT:-200}
	[ "$hf_limit" -ge 30 ] || hf_limit=30
	timeout -k 10 "$hf_limit" python3 scripts/gpu/bench_hf.py --shape scout --layers 4 \
		--batches "$(echo ${BATCHES:-1 16 64} | tr ' ' ,)" --context 128 --prefill 2048 --fp8 2>"$tmp/hf.err" | tee "$tmp/hf.out" | grep '^{' >>"$jsonl"
	[ "${PIPESTATUS[0]}" = 0 ] || { tail -5 "$tmp/hf.err"; rc=1; }
	grep -v '^{' "$tmp/hf.out" || true
fi

echo
echo "== table (card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
python3 - "$jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'impl':10s} {'format':16s} {'batch':>5s} {'decode ms':>10s} {'floor ms':>9s} {'of floor':>8s} {'GB/step':>8s} {'prefill 2048':>12s}  notes")
for r in rows:
    if r.get("impl") == "tpfleet":
        fmt = r.get("format", "") + (" offload" if r.get("offload_experts") else "")
        notes = ""
        if r.get("offload_experts"):
            pf = r.get("offload_floor_ms", 0)
            notes = "copies %.1f MB/step; PCIe floor %.3f ms (%.1f GB/s host to device), %.0f%% of it" % (
                r.get("offload_bytes_per_step", 0) / 1e6, pf, r.get("offload_gb_per_s", 0), 100 * pf / r["decode_ms_per_token"])
        pre = "%.2f" % r["prefill_ms"] if r.get("prompt_tokens") == 2048 else ""
        if pre and r.get("profile_prefill_gpu_ms"):
            notes += "prefill GPU %.2f ms; " % r["profile_prefill_gpu_ms"]
        for span, h in (("prefill", r.get("prefill_host")), ("decode step", r.get("decode_host_per_step"))):
            if h and (h["syncs"] or h["allocs"] or h["forced_gcs"] or h["go_gcs"]):
                notes += "%s host: %.1f waits, %.1f allocs, %.1f forced GCs (%.2f ms), %.1f Go GCs; " % (
                    span, h["syncs"], h["allocs"], h["forced_gcs"], h["forced_gc_ms"], h["go_gcs"])
        print(f"{'tpfleet':10s} {fmt:16s} {r['batch']:5d} {r['decode_ms_per_token']:10.3f} {r.get('decode_floor_ms', 0):9.3f} "
              f"{100 * r.get('decode_fraction_of_floor', 0):7.0f}% {r['decode_weight_bytes_per_step'] / 1e9:8.3f} {pre:>12s}  {notes}")
    elif "error" in r:
        print(f"{'hf':10s} {r.get('format', 'bf16'):16s} {r['batch']:5d} {r['error'][:90]}")
    elif r.get("what") == "sdpa-choice":
        print(f"{'hf':10s} {'sdpa choice':16s} {'':5s} {r['chosen']}: {r['wall_ms_per_step']}")
    elif r.get("what") == "decode":
        print(f"{'hf':10s} {r.get('format', 'bf16'):16s} {r['batch']:5d} {r['wall_ms']:10.3f} {r['floor_ms']:9.3f} "
              f"{100 * r['floor_ms'] / r['wall_ms']:7.0f}% {r['needed_bytes'] / 1e9:8.3f} {'':>12s}  "
              f"cpu {r['cpu_ms']:.3f} gpu {r['gpu_ms']:.3f} busy {r.get('gpu_busy_ms')} ms/step, sdpa {r.get('sdpa')}")
    elif r.get("what") == "prefill":
        print(f"{'hf':10s} {r.get('format', 'bf16'):16s} {r['batch']:5d} {'':>10s} {'':>9s} {'':>8s} {'':>8s} {r['wall_ms']:12.2f}  "
              f"cpu {r['cpu_ms']:.3f} gpu {r['gpu_ms']:.3f} ms")
PY
exit $rc
