#!/usr/bin/env python3
"""scripts/gpu/ncu_table.py: a compact table of Nsight Compute's details CSV (ncu --csv --page details).

One line a kernel launch shape (name, grid, block), its launches averaged: the duration, DRAM throughput
(% of peak, Speed Of Light), achieved occupancy (theoretical in brackets), registers per thread, warp
cycles per issued instruction, and the two largest stall reasons in cycles per issued instruction (the
smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio metrics that scripts/gpu/ncu.sh asks
for with --metrics; "-" when the CSV has none). Lines are sorted by the time they take in all, the
largest first.

    python3 scripts/gpu/ncu_table.py FILE.csv [FILE.csv ...]

Standard library only: it runs on the GPU machine's python3. Lines before the CSV header and ncu's own
messages (==PROF==, ==WARNING==, ...) are skipped, and columns past "Metric Value" (rule results) are
ignored, as are rows without a metric name (rules). Exit status 1 when a file holds no launch.
"""
import csv
import re
import sys

# Metric Unit of a duration (--csv implies --print-units base: ns; auto units spell them out) → µs.
TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
HEADER = '"ID","Process ID"'


def number(text):
    """The float in an ncu value ("1,234.5", "n/a", "" → None)."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_launches(path):
    """The launches of one details CSV, in ID order: dicts of name, grid, block and metrics, the last a list
    of (section, metric, unit, value) rows."""
    with open(path, newline="") as f:
        lines = [line for line in f if not line.startswith("==")]
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADER)), None)
    if start is None:
        return []
    launches = {}
    for row in csv.DictReader(lines[start:]):
        if not row.get("Metric Name") or row.get("ID") is None:
            continue
        launch = launches.setdefault(row["ID"], {
            "name": row["Kernel Name"], "grid": row["Grid Size"], "block": row["Block Size"], "metrics": []})
        launch["metrics"].append((row["Section Name"], row["Metric Name"], row["Metric Unit"], row["Metric Value"]))
    return [launches[k] for k in sorted(launches, key=lambda k: number(k) or 0)]


def metric(launch, name, unit=None, section=None):
    """The value of one metric of a launch (the first row with that name, unit and a section containing
    section where given), or None."""
    for sec, met, u, value in launch["metrics"]:
        if met == name and (unit is None or u == unit) and (section is None or section in sec):
            return number(value)
    return None


def duration_us(launch):
    for sec, met, unit, value in launch["metrics"]:
        if met == "Duration" and unit in TIME_UNITS and number(value) is not None:
            return number(value) * TIME_UNITS[unit]
    return None


def dram_pct(launch):
    """DRAM throughput, % of peak: Speed Of Light's, else any section's in %."""
    v = metric(launch, "DRAM Throughput", "%", "Speed Of Light")
    return v if v is not None else metric(launch, "DRAM Throughput", "%")


def stalls(launch):
    """Stall reason → cycles per issued instruction; the not-issued variants and "selected" (an issue, not
    a stall) are left out."""
    out = {}
    for _, met, _, value in launch["metrics"]:
        m = STALL.match(met)
        if m and not m.group(1).endswith("_not_issued") and m.group(1) != "selected" and number(value) is not None:
            out[m.group(1)] = number(value)
    return out


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def shape(size):
    """"(528, 1, 1)" → "528"; "(8, 2, 1)" → "8x2x1"."""
    dims = [d.strip() for d in size.strip("()").split(",")]
    return dims[0] if dims[1:] == ["1", "1"] else "x".join(dims)


def summarize(launches):
    """One dict a (name, grid, block), sorted by total duration, largest first."""
    groups = {}
    for launch in launches:
        groups.setdefault((launch["name"], launch["grid"], launch["block"]), []).append(launch)
    rows = []
    for (name, grid, block), ls in groups.items():
        st = {}
        for launch in ls:
            for reason, v in stalls(launch).items():
                st.setdefault(reason, []).append(v)
        st = sorted(((r, sum(v) / len(ls)) for r, v in st.items()), key=lambda x: -x[1])
        regs = [metric(launch, "Registers Per Thread") for launch in ls]
        rows.append({
            "name": name, "grid": shape(grid), "block": shape(block), "n": len(ls),
            "us": mean(duration_us(launch) for launch in ls),
            "dram": mean(dram_pct(launch) for launch in ls),
            "occ": mean(metric(launch, "Achieved Occupancy") for launch in ls),
            "theo": mean(metric(launch, "Theoretical Occupancy") for launch in ls),
            "regs": max((r for r in regs if r is not None), default=None),
            "cpi": mean(metric(launch, "Warp Cycles Per Issued Instruction") for launch in ls),
            "stalls": st[:2],
        })
    rows.sort(key=lambda r: -(r["us"] or 0) * r["n"])
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(rows):
    out = [f"{'kernel':28s} {'grid':>9s} {'block':>5s} {'n':>3s} {'µs mean':>8s} {'DRAM%':>6s} {'occ% (theo)':>12s} "
           f"{'regs':>4s} {'cyc/iss':>7s}  top stalls (cycles/issue)"]
    for r in rows:
        occ = f"{fmt(r['occ'], '.1f')} ({fmt(r['theo'], '.0f')})"
        st = ", ".join(f"{reason} {v:.1f}" for reason, v in r["stalls"]) or "-"
        out.append(f"{r['name'][:28]:28s} {r['grid']:>9s} {r['block']:>5s} {r['n']:3d} {fmt(r['us'], '8.1f'):>8s} "
                   f"{fmt(r['dram'], '6.1f'):>6s} {occ:>12s} {fmt(r['regs'], '4.0f'):>4s} {fmt(r['cpi'], '7.1f'):>7s}  {st}")
    return out


def main(paths):
    rc = 0
    for path in paths:
        launches = read_launches(path)
        if not launches:
            print(f"== {path}: no kernel launch in it (ncu profiled nothing? see its log)")
            rc = 1
            continue
        total = sum(duration_us(launch) or 0 for launch in launches)
        print(f"== {path}: {len(launches)} launches, {total:.1f} µs in all")
        print("\n".join(render(summarize(launches))))
    return rc


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: ncu_table.py FILE.csv [FILE.csv ...]")
    sys.exit(main(sys.argv[1:]))
