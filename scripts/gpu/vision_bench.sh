#!/usr/bin/env bash
# scripts/gpu/vision_bench.sh — issue 14's vision encoder benchmark in one device call: tpfleet's tower +
# adapter + projector on the CUDA backend (backend/cuda TestVisionEncoderBench: Scout's vision config, random
# bf16 weights, 1 and 16 tiles) and HF's Llama4VisionModel + Llama4MultiModalProjector on the same config
# and card (scripts/gpu/vision_bench.py, bf16, sdpa and eager), then a table of the time per image (tile).
#
#   bash scripts/gpu/test.sh                 here: build .gpubuild/ (backend_cuda.test.gz among it)
#   bash scripts/gpu/vision_bench.sh         on the GPU machine (no Go there), from a copy carrying .gpubuild/
#
# With the device tool: run(command="bash scripts/gpu/vision_bench.sh", carry=[".gpubuild"]). About 1-2
# minutes on an H100 (kernel compilation, 0.9 G random weights made on the host, then HF's two modes).
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=.gpubuild
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=${OUT:-$tmp}
log="$out/vision_bench.log"
gunzip -c "$BUILD/backend_cuda.test.gz" >"$tmp/cuda.test" || { echo "no $BUILD/backend_cuda.test.gz: run bash scripts/gpu/test.sh here first" >&2; exit 2; }
chmod +x "$tmp/cuda.test"
source scripts/gpu/libdirs.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$log"
rc=0
# The test binary runs from the package directory's view of the repo: testdata is found upwards.
(cd backend/cuda && timeout -k 10 "${TPFLEET_TIMEOUT:-150}" "$tmp/cuda.test" -test.v -test.count=1 -test.run='^TestVisionEncoderBench$') 2>&1 | grep -v '^=== RUN' | tee -a "$log" || rc=1
timeout -k 10 "${HF_TIMEOUT:-240}" python3 scripts/gpu/vision_bench.py 2>&1 | tee -a "$log" || rc=1
echo
python3 - "$log" <<'PY'
import re, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"VISION_BENCH (\S+)(?: impl=(\S+))? tiles=(\d+) ms=([\d.]+) ms_per_tile=([\d.]+)", line.strip())
    if m:
        who = m.group(1) + (" " + m.group(2) if m.group(2) else "")
        rows.setdefault(who, {})[int(m.group(3))] = (float(m.group(4)), float(m.group(5)))
    elif line.startswith("VISION_BENCH") and "error=" in line:
        print(line.strip())
tiles = sorted({t for r in rows.values() for t in r})
print("| encoder (Scout vision config, bf16) | " + " | ".join(f"{t} tile(s): ms (ms/tile)" for t in tiles) + " |")
print("|---|" + "---|" * len(tiles))
for who, r in rows.items():
    print(f"| {who} | " + " | ".join(f"{r[t][0]:.2f} ({r[t][1]:.2f})" if t in r else "-" for t in tiles) + " |")
PY
exit $rc
