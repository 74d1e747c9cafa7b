"""Encoder benchmark: images/s of visible-token encoding vs full-image encoding.

Run from the repo root: .venv/bin/python bench/encoder.py [--batch 32] [--repeat 3]
    [--devices cpu,cuda] [--encoders NAME,...] [--smoke]
For each encoder and masking ratio r, `visible` runs only the visible tokens through the ViT
(what sparsat does); `full` runs every token of the zero-filled canvas, which costs the same
whatever r is. Also times the two ways of batching images with different visible counts
(group by count vs pad + attention mask). The last stdout line is one JSON object.
--smoke: batch 2, one timed run, 4 mixed-count images (seconds with the default encoder).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from sparsat.bench import parse_args
from sparsat.node.data.masking import num_visible
from sparsat.node.models import encoders
from sparsat.node.models.encoders import Encoder

RATIOS = (0.0, 0.5, 0.75)
SMOKE = {"batch": 2, "repeat": 1, "ragged_images": 4}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def images_per_s(fn: Callable[[], object], n_images: int, repeat: int) -> float:
    fn()  # warm-up: allocator, kernels
    _sync()  # the warm-up's queued kernels are not timed
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def bench_encoder(enc: Encoder, batch: int, repeat: int, device: torch.device,
                  figures: dict[str, float], tag: str) -> None:
    cfg = enc.cfg
    n = enc.num_tokens
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
    images = images.to(device)
    full_idx = torch.arange(n).expand(batch, -1).to(device)
    with torch.no_grad():
        full = images_per_s(lambda: enc.encode(images, full_idx), batch, repeat)
        figures[f"{tag}_full_images_per_s"] = round(full, 1)
        print(f"{tag:24s} full image ({n} tokens)       {full:9.1f} img/s")
        for r in RATIOS:
            keep = num_visible(n, r)
            idx = torch.stack([torch.randperm(n, generator=gen)[:keep].sort().values
                               for _ in range(batch)]).to(device)
            vis = images_per_s(partial(enc.encode, images, idx), batch, repeat)
            figures[f"{tag}_r{r}_visible_images_per_s"] = round(vis, 1)
            figures[f"{tag}_r{r}_speedup_vs_full"] = round(vis / full, 2)
            print(f"{tag:24s} r={r:<4} visible ({keep:3d} tokens) {vis:9.1f} img/s"
                  f"   x{vis / full:.2f} vs full")
    figures[f"{tag}_r0.75_over_r0"] = round(
        figures[f"{tag}_r0.75_visible_images_per_s"] / figures[f"{tag}_r0.0_visible_images_per_s"],
        2)


def bench_ragged(enc: Encoder, batch: int, repeat: int, figures: dict[str, float],
                 tag: str, count: int) -> None:
    """Natural masks: each image keeps its own number of tokens (uniform 1..N)."""
    n, size = enc.num_tokens, enc.cfg.img_size
    rng = np.random.default_rng(0)
    canvases = [rng.integers(0, 256, (size, size, enc.cfg.in_chans), dtype=np.uint8)
                for _ in range(count)]
    visible = [np.sort(rng.permutation(n)[: rng.integers(1, n + 1)]).astype(np.uint16)
               for _ in range(count)]
    for ragged in ("group", "pad"):
        rate = images_per_s(partial(enc.encode_canvases, canvases, visible, batch_size=batch,
                                    ragged=ragged), count, repeat)
        figures[f"{tag}_ragged_{ragged}_images_per_s"] = round(rate, 1)
        print(f"{tag:24s} mixed counts, {ragged:5s}         {rate:9.1f} img/s")
    figures[f"{tag}_ragged_group_over_pad"] = round(
        figures[f"{tag}_ragged_group_images_per_s"] / figures[f"{tag}_ragged_pad_images_per_s"],
        2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--encoders", default=f"{encoders.DEFAULT_ENCODER},mae_vit_base_patch16")
    parser.add_argument("--ragged-images", type=int, default=256,
                        help="images with mixed visible counts for group vs pad (0: skip)")
    parser.add_argument("--devices", default=None,
                        help="comma-separated: cpu, cuda (default: cpu, plus cuda when there "
                             "is one)")
    args = parse_args(parser, argv, SMOKE)
    names = args.devices.split(",") if args.devices else (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    bad = [d for d in names if d not in ("cpu", "cuda")]
    if bad or not names:
        parser.error(f"--devices: unknown device(s) {bad}; choose from cpu, cuda")
    if "cuda" in names and not torch.cuda.is_available():
        parser.error("--devices cuda: CUDA is not available on this machine")
    devices = [torch.device(d) for d in names]
    figures: dict[str, Any] = {"batch": args.batch, "threads": torch.get_num_threads(),
                               "devices": names}
    if "cuda" in names:
        figures["cuda_device"] = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    for name in args.encoders.split(","):
        # speed does not depend on the weights' values: random weights, nothing to download
        enc = encoders.create(name, weights="random")
        for device in devices:
            tag = f"{name}_{device.type}"
            bench_encoder(enc.to(device), args.batch, args.repeat, device, figures, tag)
            if args.ragged_images:
                bench_ragged(enc, args.batch, args.repeat, figures, tag, args.ragged_images)
    figures["runtime_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
