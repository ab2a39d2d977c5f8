#!/usr/bin/env python3
"""HF transformers baseline for the vision encoder benchmark (issue 14): Llama4VisionModel (patch embedding,
34 encoder layers, pixel-shuffle adapter) followed by Llama4MultiModalProjector, on Scout's vision config
(hidden 1408, 16 heads, intermediate 5632, 336-pixel tiles of 14-pixel patches, vision_output_dim 4096, text
hidden 5120) with random weights in bf16, for 1 and 16 tiles, under attn_implementation "sdpa" and "eager".
The time is the median of 5 runs after 2 warm-ups, synchronised (torch.cuda.synchronize), under
torch.inference_mode. backend/cuda's TestVisionEncoderBench times tpfleet on the same config;
scripts/gpu/vision_bench.sh runs both and prints a table.

Runs on the GPU machine (PyTorch 2.11, transformers 5.17). Prints one line per measurement:
    VISION_BENCH hf impl=sdpa tiles=16 ms=... ms_per_tile=...
or, when a mode fails, VISION_BENCH hf impl=eager error=...

    python3 scripts/gpu/vision_bench.py [--tiles 1,16] [--runs 5]
"""
import argparse
import statistics
import time

import torch
from transformers import Llama4Config
from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

VISION = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, num_channels=3, intermediate_size=5632,
              vision_output_dim=4096, image_size=336, patch_size=14, norm_eps=1e-5, pixel_shuffle_ratio=0.5,
              projector_input_dim=4096, projector_output_dim=4096, multi_modal_projector_bias=False, rope_theta=10000)


def build(impl):
    cfg = Llama4Config(vision_config=dict(VISION), text_config=dict(hidden_size=5120))
    cfg.vision_config._attn_implementation = impl
    with torch.device("cuda"):
        tower = Llama4VisionModel(cfg.vision_config)
        proj = Llama4MultiModalProjector(cfg)
    return tower.to(torch.bfloat16).eval(), proj.to(torch.bfloat16).eval()


def time_one(tower, proj, tiles, runs):
    pix = torch.rand(tiles, 3, 336, 336, device="cuda", dtype=torch.bfloat16) * 2 - 1
    times = []
    with torch.inference_mode():
        for i in range(runs + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            feats = tower(pix).last_hidden_state
            out = proj(feats)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
    assert out.shape == (tiles, 144, 5120), out.shape
    assert torch.isfinite(out.float()).all()
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", default="1,16")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--impls", default="sdpa,eager")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for impl in args.impls.split(","):
        try:
            tower, proj = build(impl)
            for tiles in [int(t) for t in args.tiles.split(",")]:
                ms = time_one(tower, proj, tiles, args.runs)
                print(f"VISION_BENCH hf impl={impl} tiles={tiles} ms={ms:.2f} ms_per_tile={ms / tiles:.2f}", flush=True)
            del tower, proj
            torch.cuda.empty_cache()
        except Exception as e:  # report and go on with the other mode
            msg = str(e).replace("\n", " ")[:200]
            print(f"VISION_BENCH hf impl={impl} error={type(e).__name__}: {msg}", flush=True)


if __name__ == "__main__":
    main()
