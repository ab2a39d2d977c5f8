#!/usr/bin/env bash
# scripts/gpu/load_bench.sh — start-up at storage speed (issue 21): weight load of a Scout-shaped checkpoint by
# tpfleet and by HF transformers in the same call, page cache warm and cold, against the disk's rate, and the
# kernel cache empty and filled.
#
#   scripts/gpu/load_bench.sh          here: build .gpubuild/ (as scripts/gpu/test.sh does)
#   scripts/gpu/load_bench.sh --run    on the GPU machine (PyTorch 2.11, transformers 5.17):
#     1. writes a random bf16 Scout-shaped checkpoint of $LAYERS (4) layers in HF's layout (save_pretrained, 5 GB
#        shards: 5 shards, 21.8 GB for 4 layers) under $LOAD_DIR (/var/tmp/tpfleet-load), unless it is there;
#     2. tpfleet warmup with an empty kernel cache, then again (filled);
#     3. the disk's sequential rate: every shard evicted from the page cache (posix_fadvise DONTNEED, and
#        /proc/sys/vm/drop_caches where permitted), then dd iflag=direct bs=64M, one file after another;
#     4. tpfleet score --device cuda cold (evicted again before each run; O_DIRECT and buffered), then warm (best
#        of 2), then warm with an empty kernel cache; each prints its start-up phase table;
#     5. HF Llama4ForCausalLM.from_pretrained(device_map="cuda"), warm, best of 2;
#   then a table last; JSON lines in $OUT/load_bench.jsonl.
#
# With the device tool: run(command="bash scripts/gpu/load_bench.sh --run", carry=[".gpubuild"]). About 3 minutes
# on an H100 for 4 layers, most of it writing the checkpoint; 48 layers need about 220 GB of disk ($LAYERS=48).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild

if [ "${1:-}" != "--run" ]; then
	exec bash scripts/gpu/test.sh
fi

LAYERS=${LAYERS:-4}
tmp=$(mktemp -d)
out=${OUT:-$tmp}
jsonl="$out/load_bench.jsonl"
: >"$jsonl"
gunzip -c "$BUILD/tpfleet.gz" >"$tmp/tpfleet"
chmod +x "$tmp/tpfleet"
tpf="$tmp/tpfleet"
source scripts/gpu/libdirs.sh
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "== $(date -u +%FT%TZ) $(hostname) $card, $(nproc) cores"

dir=${LOAD_DIR:-/var/tmp/tpfleet-load}/scout-${LAYERS}l
mkdir -p "$(dirname "$dir")"
need=$((LAYERS * 45 / 10 + 5)) # GB
avail=$(df -BG --output=avail "$(dirname "$dir")" | tail -1 | tr -dc 0-9)
df -h "$(dirname "$dir")" | tail -1
if [ ! -f "$dir/model.safetensors.index.json" ]; then
	if [ "$avail" -lt "$need" ]; then
		echo "load_bench: $LAYERS layers need about $need GB on $(dirname "$dir"), $avail GB free" >&2
		exit 1
	fi
	echo "== writing a $LAYERS-layer Scout-shaped checkpoint to $dir"
	rm -rf "$dir"
	python3 scripts/gpu/load_bench.py write "$dir" --layers "$LAYERS" | tee -a "$jsonl"
fi
shards=("$dir"/*.safetensors)
bytes=$(du -cb "${shards[@]}" | tail -1 | cut -f1)
echo "${#shards[@]} shards, $bytes bytes"

# minus A B: A - B, for times from date +%s.%N (no bc on the GPU machine).
minus() { python3 -c "print(round($1 - $2, 3))"; }

evict() {
	python3 scripts/gpu/load_bench.py drop "${shards[@]}"
	sync
	(echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null || true
}

# phases FILE LABEL WALL: the phase table a tpfleet command printed on stderr, as one JSON line.
phases() {
	python3 - "$1" "$2" "$3" "$bytes" "$card" <<'PY'
import json, re, sys
path, label, wall, size, card = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ph = {}
for line in open(path, errors="replace"):
    m = re.match(r"^(\S+)\s+(-?[\d.]+)s\s+([\d.]+)s\s*(.*)$", line.rstrip("\n"))
    if m and m.group(1) != "phase":
        ph[m.group(1)] = {"start_s": float(m.group(2)), "took_s": float(m.group(3)), "detail": m.group(4)}
w = ph.get("weights", {}).get("took_s")
print(json.dumps({"impl": "tpfleet", "what": label, "bytes": size, "card": card, "wall_s": wall,
                  "gb_per_s": round(size / 1e9 / w, 2) if w else None, "phases": ph}))
PY
}

# score LABEL [FLAGS]: one tpfleet score of 4 tokens, its phases appended to the JSON lines.
score() {
	local label=$1
	shift
	local t0 t1
	t0=$(date +%s.%N)
	if ! timeout -k 10 120 "$tpf" score --device cuda --model "$dir" --ids 1,2,3,4 --out "$tmp/logits.safetensors" "$@" 2>"$tmp/$label.err"; then
		tail -5 "$tmp/$label.err"
		echo "{\"impl\": \"tpfleet\", \"what\": \"$label\", \"error\": \"score failed\"}" >>"$jsonl"
		return
	fi
	t1=$(date +%s.%N)
	echo "== tpfleet score, $label"
	grep -A20 '^phase ' "$tmp/$label.err" || tail -5 "$tmp/$label.err"
	phases "$tmp/$label.err" "$label" "$(minus "$t1" "$t0")" >>"$jsonl"
}

# 2. kernel cache: empty, then filled.
export TPFLEET_KERNEL_CACHE="$tmp/kernels"
for label in empty filled; do
	echo "== tpfleet warmup, kernel cache $label"
	"$tpf" warmup --device cuda 2>&1 | tee "$tmp/warmup-$label.err"
	phases "$tmp/warmup-$label.err" "warmup-cache-$label" 0 >>"$jsonl"
done

# 3. the disk's sequential read rate, cold.
evict
t0=$(date +%s.%N)
for s in "${shards[@]}"; do dd if="$s" of=/dev/null bs=64M iflag=direct status=none; done
t1=$(date +%s.%N)
dd_s=$(minus "$t1" "$t0")
echo "{\"impl\": \"dd\", \"what\": \"cold sequential, O_DIRECT, 64 MiB\", \"bytes\": $bytes, \"s\": $dd_s, \"gb_per_s\": $(python3 -c "print(round($bytes / 1e9 / $dd_s, 2))")}" | tee -a "$jsonl"

# 4. tpfleet: cold (O_DIRECT, then buffered), warm (best of two), warm with an empty kernel cache.
evict
score cold-direct --load-direct
evict
score cold-buffered
cat "${shards[@]}" >/dev/null
score warm-1
score warm-2
TPFLEET_KERNEL_CACHE="$tmp/kernels-empty" score warm-empty-kernel-cache

# 5. HF transformers, warm.
echo "== HF from_pretrained(device_map=cuda), warm"
timeout -k 10 300 python3 scripts/gpu/load_bench.py hf "$dir" --runs 2 2>"$tmp/hf.err" | tee -a "$jsonl" || tail -5 "$tmp/hf.err"

echo
echo "== table ($card, $bytes bytes in ${#shards[@]} shards)"
python3 - "$jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def get(r, name, key="took_s"):
    return r.get("phases", {}).get(name, {}).get(key, float("nan"))
print(f"{'what':26s} {'weights s':>9s} {'GB/s':>6s} {'read s':>7s} {'copy s':>7s} {'quant s':>7s} {'context s':>9s} {'compile s':>9s} {'1st step s':>10s} {'ready s':>7s}")
hf = dd = best = cold = None
for r in rows:
    if r.get("impl") == "hf":
        hf = r
        print(f"{'hf from_pretrained warm':26s} {r['s']:9.3f} {r['gb_per_s']:6.2f}")
    elif r.get("impl") == "dd":
        dd = r
        print(f"{'dd cold O_DIRECT':26s} {r['s']:9.3f} {r['gb_per_s']:6.2f}")
    elif r.get("impl") == "tpfleet" and "error" not in r:
        w = get(r, "weights")
        print(f"{r['what']:26s} {w:9.3f} {r.get('gb_per_s') or float('nan'):6.2f} {get(r, 'weight-read'):7.3f} {get(r, 'weight-copy'):7.3f} "
              f"{get(r, 'quantize'):7.3f} {get(r, 'cuda-context'):9.3f} {get(r, 'kernel-compile'):9.3f} {get(r, 'first-step'):10.3f} {get(r, 'ready'):7.3f}")
        if r["what"].startswith("warm-") and "empty" not in r["what"] and (best is None or w < get(best, "weights")):
            best = r
        if r["what"].startswith("cold") and (cold is None or w < get(cold, "weights")):
            cold = r
    elif "error" in r:
        print(f"{r.get('what', '?'):26s} error: {r['error']}")
print()
if best and hf:
    print(f"warm: tpfleet {best['gb_per_s']:.2f} GB/s = {best['gb_per_s'] / hf['gb_per_s']:.2f}x HF's {hf['gb_per_s']:.2f} GB/s (target >= 1.5x)")
if cold and dd:
    print(f"cold: tpfleet {cold['gb_per_s']:.2f} GB/s = {100 * cold['gb_per_s'] / dd['gb_per_s']:.0f} % of dd's {dd['gb_per_s']:.2f} GB/s (target >= 80 %)")
if best:
    print(f"filled kernel cache: ready {get(best, 'ready'):.2f} s = weights {get(best, 'weights'):.2f} s + {get(best, 'ready') - get(best, 'weights'):.2f} s (target <= 1 s)")
PY
