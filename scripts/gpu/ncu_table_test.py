#!/usr/bin/env python3
"""Tests of scripts/gpu/ncu_table.py on testdata/ncu-details.csv, a hand-written file in the format of
`ncu --csv --page details` (rule columns and rule rows, thousands separators, n/a, ncu's ==PROF== lines
around it, and the command-line stall metrics). The expected numbers are worked out by hand from that file.

    python3 scripts/gpu/ncu_table_test.py
"""
import contextlib
import io
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # no __pycache__ in the work tree
sys.path.insert(0, HERE)
import ncu_table  # noqa: E402

SAMPLE = os.path.join(HERE, "testdata", "ncu-details.csv")


class NcuTableTest(unittest.TestCase):
    def test_launches(self):
        launches = ncu_table.read_launches(SAMPLE)
        self.assertEqual([(l["name"], l["grid"]) for l in launches],
                         [("gemv_split_1", "(1280, 1, 1)"), ("gemv_split_1", "(1280, 1, 1)"), ("attention_decode", "(528, 1, 1)")])
        # Rule rows (no metric name) are not metrics.
        self.assertTrue(all(m[1] for l in launches for m in l["metrics"]))

    def test_summary(self):
        rows = ncu_table.summarize(ncu_table.read_launches(SAMPLE))
        # attention_decode: 54.3 µs once; gemv_split_1: (20.48 + 21.52) / 2 = 21.0 µs twice: 54.3 > 42.
        self.assertEqual([r["name"] for r in rows], ["attention_decode", "gemv_split_1"])
        att, gemv = rows
        want = {"grid": "1280", "block": "128", "n": 2, "us": 21.0, "dram": 85.0, "occ": 46.0, "theo": 50.0, "regs": 40.0, "cpi": 31.0}
        for k, v in want.items():
            self.assertAlmostEqual(gemv[k], v, msg=f"gemv_split_1 {k}")
        # Stalls averaged over the two launches: long_scoreboard (22 + 24) / 2, barrier (2 + 4) / 2, wait
        # (3 + 2) / 2; the _not_issued variant, "selected" and the n/a mio_throttle are left out.
        self.assertEqual([r for r, _ in gemv["stalls"]], ["long_scoreboard", "barrier"])
        self.assertAlmostEqual(gemv["stalls"][0][1], 23.0)
        self.assertAlmostEqual(gemv["stalls"][1][1], 3.0)
        self.assertEqual(att["regs"], 168)
        self.assertAlmostEqual(att["us"], 54.3)
        self.assertAlmostEqual(att["dram"], 12.5)  # Speed Of Light's DRAM Throughput, not Memory Throughput
        self.assertEqual([r for r, _ in att["stalls"]], ["barrier", "long_scoreboard"])

    def test_render(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(ncu_table.main([SAMPLE]), 0)
        lines = out.getvalue().splitlines()
        self.assertIn("3 launches, 96.3 µs in all", lines[0])
        self.assertTrue(lines[2].startswith("attention_decode"), lines[2])
        self.assertIn("9.8 (25)", lines[2])
        self.assertIn("barrier 30.1, long_scoreboard 25.2", lines[2])
        self.assertIn("long_scoreboard 23.0, barrier 3.0", lines[3])

    def test_units_and_values(self):
        for unit, us in [("ns", 2.848), ("nsecond", 2.848), ("usecond", 2848.0), ("msecond", 2848000.0)]:
            launch = {"metrics": [("GPU Speed Of Light Throughput", "Duration", unit, "2,848")]}
            self.assertAlmostEqual(ncu_table.duration_us(launch), us, msg=unit)
        self.assertIsNone(ncu_table.number("n/a"))
        self.assertEqual(ncu_table.shape("(8, 2, 1)"), "8x2x1")

    def test_empty(self):
        with tempfile.NamedTemporaryFile("w", suffix=".csv") as f:
            f.write("==PROF== Disconnected from process 1\n==ERROR== The application returned an error code (1).\n")
            f.flush()
            with contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(ncu_table.main([f.name]), 1)


if __name__ == "__main__":
    unittest.main()
