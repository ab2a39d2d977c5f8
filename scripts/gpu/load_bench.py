#!/usr/bin/env python3
"""Helpers of scripts/gpu/load_bench.sh (runs on the GPU machine: PyTorch 2.11, transformers 5.17).

    python3 scripts/gpu/load_bench.py write DIR [--layers 4]   a Scout-shaped random bf16 checkpoint in HF's layout
                                                                (save_pretrained, 5 GB shards: 5 shards for 4 layers)
    python3 scripts/gpu/load_bench.py hf DIR [--runs 2]         HF from_pretrained(device_map="cuda") time, best of runs,
                                                                page cache warm (one JSON line)
    python3 scripts/gpu/load_bench.py drop FILE...              evict files from the page cache (posix_fadvise DONTNEED)
"""
import argparse
import glob
import json
import os
import sys
import time


def scout_config(layers):
    from transformers import Llama4TextConfig
    return Llama4TextConfig(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=layers, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        num_experts_per_tok=1, max_position_embeddings=8192, attention_chunk_size=8192,
        num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    )


def write(args):
    import torch
    from transformers import Llama4ForCausalLM
    cfg = scout_config(args.layers)
    start = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):  # bf16 from the start, as scripts/gpu/bench_hf.py makes its models
        model = Llama4ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    # Random values everywhere (HF's init leaves some tensors constant): a benchmark never loads zeros.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(args.dir, max_shard_size="5GB")
    shards = sorted(glob.glob(os.path.join(args.dir, "*.safetensors")))
    size = sum(os.path.getsize(s) for s in shards)
    os.sync()
    print(json.dumps({"what": "write", "dir": args.dir, "layers": args.layers, "shards": len(shards), "bytes": size,
                      "s": round(time.time() - start, 2)}))


def hf(args):
    import torch
    from transformers import Llama4ForCausalLM
    shards = sorted(glob.glob(os.path.join(args.dir, "*.safetensors")))
    size = sum(os.path.getsize(s) for s in shards)
    for s in shards:  # warm the page cache
        with open(s, "rb") as f:
            while f.read(64 << 20):
                pass
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the CUDA context is not part of the load
    best = None
    for _ in range(args.runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model = Llama4ForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, device_map="cuda")
        torch.cuda.synchronize()
        took = time.perf_counter() - start
        best = took if best is None else min(best, took)
        del model
        torch.cuda.empty_cache()
    print(json.dumps({"impl": "hf", "what": "from_pretrained", "cache": "warm", "bytes": size, "s": round(best, 3),
                      "gb_per_s": round(size / 1e9 / best, 2), "gpu": torch.cuda.get_device_name()}))


def drop(args):
    for path in args.files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir")
    w.add_argument("--layers", type=int, default=4)
    h = sub.add_parser("hf")
    h.add_argument("dir")
    h.add_argument("--runs", type=int, default=2)
    d = sub.add_parser("drop")
    d.add_argument("files", nargs="+")
    args = ap.parse_args()
    {"write": write, "hf": hf, "drop": drop}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
