#!/usr/bin/env python3
"""HF transformers baseline for the GPU benchmarks, at HF's best working mode: random bf16 Llama 4 text models of
Scout and Maverick shape.

Runs on the GPU machine (PyTorch 2.11, transformers 5.17). The mode:
  * eager model (no torch.compile: slower there; the static cache crashes on Llama 4) with attn_implementation="sdpa";
  * SDPA's backend chosen by measuring: a few decode steps under each of flash, efficient, cudnn and math
    (torch.nn.attention.sdpa_kernel), the fastest kept for every run. SDPA's default order tries cuDNN first, which
    re-plans as the KV length grows (aten::_cudnn_attention_forward took 9.4 ms of CPU a call on an H100 while the
    GPU worked 6.8 ms a step), so the default is not HF's best;
  * a hand decode loop over a DynamicCache (greedy argmax of the last logits fed back), not generate(): generate()
    adds its own per-step CPU work (logits processors, stopping criteria, cache bookkeeping).
Each decode measurement reports, per step: wall time (host clock around the loop, synchronised at the end), CPU
time (the process's CPU clock over the loop) and GPU time (CUDA events around each step: the stream's time from the
step's first to its last kernel, idle gaps included) and, from a short torch.profiler run, the GPU busy time (the
sum of the kernels' device time). When CPU ≥ GPU busy, the step is CPU-bound.

Prints one JSON object per measurement and a table last. Also measures the device-to-device copy bandwidth that
defines the memory-bandwidth floor.

    python3 scripts/gpu/bench_hf.py --shape scout --layers 4 --batches 1,16,64 --prefill 2048 [--fp8]

--fp8 asks for HF's FbgemmFp8 (FbgemmFp8Config: per-row FP8 weights, per-token FP8 activations, fbgemm's
f8f8bf16_rowwise GEMM), the format `tpfleet --quantization fp8` follows. transformers 5.17 has no FbgemmFp8 path
without the fbgemm-gpu package (its quantizer refuses to load without it); where it is absent the script prints one
JSON line saying so instead of a measurement.
"""
import argparse
import importlib.util
import json
import time

import torch
from transformers import DynamicCache, Llama4ForCausalLM, Llama4TextConfig

SHAPES = {
    # 4-layer Scout: every layer MoE, 16 experts.
    "scout": dict(num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True),
    # 4-layer Maverick: 128 experts on odd layers, dense 16384 on even layers, no qk-norm.
    "maverick": dict(num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False),
}

IMPL = "hf-transformers-5.17 eager sdpa hand-loop"


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


def sdpa_backends():
    """SDPA's backends by name (torch.nn.attention.SDPBackend), the ones this torch has."""
    from torch.nn.attention import SDPBackend
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def sdpa_context(backend):
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel([backend])


def prefill(model, cfg, batch, context):
    """A DynamicCache holding `context` random tokens for each of `batch` sequences, and the next ids (greedy)."""
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device="cuda")
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


def decode(model, cache, ids, steps, events=None):
    """`steps` hand-loop decode steps through cache from ids; with events, a (start, end) CUDA event pair a step."""
    for i in range(steps):
        if events is not None:
            events[i][0].record()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)
        if events is not None:
            events[i][1].record()
    return ids


def gpu_busy_ms(model, cache, ids, steps):
    """The kernels' device time a decode step, summed over a short torch.profiler run (None where it fails)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decode(model, cache, ids, steps)
            torch.cuda.synchronize()
        # Self device time summed over every op is each kernel's time counted once.
        total_us = 0.0
        for e in prof.key_averages():
            total_us += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return total_us / 1000 / steps
    except Exception:  # noqa: BLE001 (a profiler failure costs this one column, not the run)
        return None


def measure_decode(model, cfg, batch, context, steps, warmup):
    cache, ids = prefill(model, cfg, batch, context)
    ids = decode(model, cache, ids, warmup)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    ids = decode(model, cache, ids, steps, events)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - wall0) * 1000 / steps
    cpu = (time.process_time() - cpu0) * 1000 / steps
    gpu = sum(s.elapsed_time(e) for s, e in events) / steps
    busy = gpu_busy_ms(model, cache, ids, min(steps, 5))
    del cache
    return dict(ms=round(wall, 3), wall_ms=round(wall, 3), cpu_ms=round(cpu, 3), gpu_ms=round(gpu, 3),
                gpu_busy_ms=None if busy is None else round(busy, 3))


def choose_backend(model, cfg, context):
    """Measures a few batch-1 decode steps under each SDPA backend; returns the fastest's name and every time."""
    times = {}
    for name, be in sdpa_backends().items():
        try:
            with sdpa_context(be):
                r = measure_decode(model, cfg, 1, context, steps=8, warmup=3)
            times[name] = r["wall_ms"]
        except Exception as e:  # noqa: BLE001 (a backend that cannot run this shape is not a candidate)
            times[name] = f"error: {type(e).__name__}: {str(e)[:80]}"
        torch.cuda.empty_cache()
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    if not ok:
        raise SystemExit(f"no SDPA backend ran: {times}")
    return min(ok, key=ok.get), times


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="scout", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=128, help="cached tokens before the timed decode steps")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--sdpa", default="auto", help="SDPA backend: auto (measure), flash, efficient, cudnn, math, default")
    ap.add_argument("--fp8", action="store_true", help="also HF FbgemmFp8 (needs fbgemm-gpu)")
    args = ap.parse_args()

    bw = copy_bandwidth()
    cfg = config(args.shape, args.layers)
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    if args.fp8:
        # FbgemmFp8HfQuantizer.validate_environment refuses without fbgemm-gpu; there is no other rowwise FP8
        # path in transformers 5.17 (FineGrainedFP8 is 128x128 block-wise, a different format).
        if importlib.util.find_spec("fbgemm_gpu") is None:
            print(json.dumps(dict(gpu=gpu, shape=args.shape, layers=args.layers, impl=IMPL + " fbgemm-fp8", what="decode",
                                  format="fp8", batch=0, error="FbgemmFp8Config needs fbgemm-gpu, not installed here: "
                                  "transformers 5.17 has no rowwise FP8 path without it")), flush=True)
        else:
            print(json.dumps(dict(gpu=gpu, shape=args.shape, impl=IMPL + " fbgemm-fp8", what="decode", format="fp8",
                                  batch=0, error="fbgemm-gpu is installed but this script does not run FbgemmFp8 "
                                  "(it loads through from_pretrained only)")), flush=True)
    t0 = time.time()
    # _from_config with dtype, not torch.set_default_dtype(bfloat16): the latter made every decode step
    # ~10x slower (63 vs 6.1 ms/step for Scout-4L on an H200).
    with torch.device("cuda"):
        model = Llama4ForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = dict(gpu=gpu, shape=args.shape, layers=args.layers, weight_bytes=weights, copy_bw=bw, format="bf16",
                impl=IMPL, build_s=round(time.time() - t0, 1), torch=torch.__version__)

    backends = sdpa_backends()
    if args.sdpa == "auto":
        chosen, times = choose_backend(model, cfg, args.context)
        print(json.dumps(dict(base, what="sdpa-choice", batch=1, chosen=chosen, wall_ms_per_step=times)), flush=True)
    else:
        chosen = args.sdpa
    base["sdpa"] = chosen

    def ctx():
        if chosen == "default":
            import contextlib
            return contextlib.nullcontext()
        return sdpa_context(backends[chosen])

    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        try:
            with ctx():
                r = measure_decode(model, cfg, batch, args.context, args.steps, warmup=5)
        except torch.OutOfMemoryError as e:
            print(json.dumps(dict(base, what="decode", batch=batch, error=f"out of memory: {e}"[:200])), flush=True)
            torch.cuda.empty_cache()
            continue
        floor = needed_bytes(cfg, batch) / bw * 1000
        r = dict(base, what="decode", batch=batch, floor_ms=round(floor, 3), needed_bytes=needed_bytes(cfg, batch), **r)
        print(json.dumps(r), flush=True)
        results.append(r)
        torch.cuda.empty_cache()

    if args.prefill:
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device="cuda")

        def run():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

        with ctx():
            for _ in range(1):
                run()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            start.record()
            for _ in range(3):
                run()
            end.record()
            torch.cuda.synchronize()
        wall = (time.perf_counter() - wall0) * 1000 / 3
        r = dict(base, what="prefill", batch=1, tokens=args.prefill, ms=round(wall, 3), wall_ms=round(wall, 3),
                 cpu_ms=round((time.process_time() - cpu0) * 1000 / 3, 3), gpu_ms=round(start.elapsed_time(end) / 3, 3))
        print(json.dumps(r), flush=True)
        results.append(r)

    print(f"\n{gpu}: {args.shape} {args.layers} layers, {weights / 1e9:.2f} GB bf16, copy {bw / 1e12:.2f} TB/s, "
          f"SDPA backend {chosen}, hand decode loop over a DynamicCache")
    print(f"{'what':8s} {'batch':>5s} {'wall ms':>9s} {'cpu ms':>9s} {'gpu ms':>9s} {'busy ms':>9s} {'floor ms':>9s}")
    for r in results:
        busy = r.get("gpu_busy_ms")
        print(f"{r['what']:8s} {r['batch']:5d} {r['wall_ms']:9.3f} {r['cpu_ms']:9.3f} {r['gpu_ms']:9.3f} "
              f"{busy if busy is not None else float('nan'):9.3f} {r.get('floor_ms', float('nan')):9.3f}")


if __name__ == "__main__":
    main()
