#!/usr/bin/env python3
"""HF transformers baseline for the GPU benchmarks: random bf16 Llama 4 text models of Scout and Maverick shape.

Runs on the GPU machine (PyTorch 2.11, transformers 5.17). Eager attention with sdpa is HF's best working mode for
Llama 4 there (its static cache crashes on Llama 4; torch.compile is slower). Prints one JSON object per measurement
and a table last. Also measures the device-to-device copy bandwidth that defines the memory-bandwidth floor.

    python3 scripts/gpu/bench_hf.py --shape scout --layers 4 --batches 1,16,64 --prefill 2048
"""
import argparse
import json
import time

import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

SHAPES = {
    # 4-layer Scout: every layer MoE, 16 experts.
    "scout": dict(num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True),
    # 4-layer Maverick: 128 experts on odd layers, dense 16384 on even layers, no qk-norm.
    "maverick": dict(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False),
}


def config(shape, layers):
    return Llama4TextConfig(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=layers, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        num_experts_per_tok=1, max_position_embeddings=8192, attention_chunk_size=8192,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        **SHAPES[shape],
    )


def needed_bytes(cfg, batch):
    """Weight bytes a batch-`batch` decode step must read when it reads only the routed experts it uses."""
    h, e, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = (cfg.num_attention_heads * d * h * 2 + cfg.num_key_value_heads * d * h * 2) * 2
    expert = 3 * h * e * 2
    total = 0
    for layer in range(cfg.num_hidden_layers):
        total += attn
        if layer in cfg.moe_layers:
            active = min(batch, cfg.num_local_experts)  # top-1: at most one expert per token
            total += expert * active + expert + cfg.num_local_experts * h * 2  # routed + shared + router
        else:
            total += 3 * h * cfg.intermediate_size_mlp * 2
    total += cfg.vocab_size * h * 2  # lm_head
    return total


def copy_bandwidth():
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1000 / 10
    del a, b
    return 2 * n / sec  # bytes read + written per second


def timed(fn, warmup=2, iters=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="scout", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=128, help="cached tokens before the timed decode steps")
    ap.add_argument("--prefill", type=int, default=2048)
    args = ap.parse_args()

    bw = copy_bandwidth()
    cfg = config(args.shape, args.layers)
    torch.manual_seed(0)
    t0 = time.time()
    # _from_config with dtype, not torch.set_default_dtype(bfloat16): the latter made every decode step
    # ~10x slower (63 vs 6.1 ms/step for Scout-4L on an H200).
    with torch.device("cuda"):
        model = Llama4ForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gpu = torch.cuda.get_device_name()
    results = []
    base = dict(gpu=gpu, shape=args.shape, layers=args.layers, weight_bytes=weights, copy_bw=bw,
                impl="hf-transformers-5.17 eager sdpa", build_s=round(time.time() - t0, 1))

    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (batch, args.context), device="cuda")
        try:
            out = model(input_ids=ids, use_cache=True)
        except torch.OutOfMemoryError as e:
            print(json.dumps(dict(base, what="decode", batch=batch, error=f"out of memory: {e}"[:200])), flush=True)
            torch.cuda.empty_cache()
            continue
        cache = out.past_key_values
        step_ids = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")

        # The model derives positions from the cache length.
        def step():
            model(input_ids=step_ids, past_key_values=cache, use_cache=True)

        try:
            ms = timed(step, warmup=5, iters=20)
        except torch.OutOfMemoryError as e:
            print(json.dumps(dict(base, what="decode", batch=batch, error=f"out of memory: {e}"[:200])), flush=True)
            del cache, out
            torch.cuda.empty_cache()
            continue
        floor = needed_bytes(cfg, batch) / bw * 1000
        r = dict(base, what="decode", batch=batch, ms=round(ms, 3), floor_ms=round(floor, 3),
                 needed_bytes=needed_bytes(cfg, batch))
        print(json.dumps(r), flush=True)
        results.append(r)
        del cache, out
        torch.cuda.empty_cache()

    if args.prefill:
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device="cuda")
        ms = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), warmup=1, iters=3)
        r = dict(base, what="prefill", batch=1, tokens=args.prefill, ms=round(ms, 3))
        print(json.dumps(r), flush=True)
        results.append(r)

    print(f"\n{gpu}: {args.shape} {args.layers} layers, {weights / 1e9:.2f} GB bf16, copy {bw / 1e12:.2f} TB/s")
    print(f"{'what':8s} {'batch':>5s} {'ms':>9s} {'floor ms':>9s}")
    for r in results:
        print(f"{r['what']:8s} {r['batch']:5d} {r['ms']:9.3f} {r.get('floor_ms', float('nan')):9.3f}")


if __name__ == "__main__":
    main()
