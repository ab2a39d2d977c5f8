#!/usr/bin/env python3
"""Compares tpfleet's tokenizer with HF tokenizers on testdata/tokenizer (run where `tokenizers` is installed).

    python3 scripts/gpu/tokenizer_check.py --tpfleet PATH/TO/tpfleet
"""
import argparse
import json
import subprocess

from tokenizers import Tokenizer

CASES = [
    "Hello world", "I'M here, you're THERE and they'LL come", "  leading   spaces\tand\ttabs  ", "line\r\nbreaks\n\n\nend",
    "数字123456 and 中文文本", "مرحبا بالعالم", "emoji 👩‍👩‍👧‍👦 family 🚀", "<|begin_of_text|>special<|eot|> inline",
    "a" * 300, "", "x", "The quick brown fox jumps over the lazy dog. 1234567890!@#$%^&*()",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tpfleet", required=True)
    ap.add_argument("--dir", default="testdata/tokenizer")
    args = ap.parse_args()
    tok = Tokenizer.from_file(f"{args.dir}/tokenizer.json")
    bad = 0
    for text in CASES:
        want = tok.encode(text, add_special_tokens=True).ids
        out = subprocess.run([args.tpfleet, "tokenize", "--model", args.dir, "--text", text, "--json"],
                             capture_output=True, text=True, check=True).stdout
        got = json.loads(out)["ids"]
        ok = got == want
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {text[:40]!r}: hf {want[:12]}{'...' if len(want) > 12 else ''} tpfleet {got[:12]}")
        back = tok.decode(want, skip_special_tokens=False)
        if not ok:
            print(f"    hf decode: {back!r}")
    print(f"tokenizer check: {len(CASES) - bad} passed, {bad} failed")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
