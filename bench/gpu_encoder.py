"""The encoder's dense forward on one device in fp32 and in bf16 autocast, on the same batches: images/s of each,
whether they agree, and which of the two the shipped `encode_dense` runs. Prints JSON.

    python bench/gpu_encoder.py --encoder clip-vit-b16 --device cuda --batch-size 64 --batches 20
    python bench/gpu_encoder.py --encoder synthetic-clip --device cpu --batch-size 4 --batches 2    # dry run

The encoders have no precision switch: `encode_dense` runs under `registry.autocast(device)` (bf16 on CUDA, off
elsewhere), which each family module imports by name. fp32 and bf16 are measured by replacing that name in the
encoder's own module for the duration of a run, so both runs go through the encoder's code, and the shipped run
(nothing replaced) is compared with both. Agreement: cosine between the fp32 and bf16 feature of every cell of
the g×g grid; the run passes when the mean and the 1st percentile reach the given floors. Images: seeded noise
smoothed into blobs (the weights are untrained unless --weights says otherwise, so content does not matter).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from bank_builder.config import EncoderConfig
from bank_builder.encoders import load_encoder
from bank_builder.encoders.base import Encoder


@contextlib.contextmanager
def precision(encoder: Encoder, dtype: torch.dtype) -> Iterator[None]:
    """Run the encoder's forward in `dtype` (float32: autocast off; bfloat16: autocast on), on any device."""
    module = sys.modules[type(encoder).__module__]
    if not callable(getattr(module, "autocast", None)):
        raise RuntimeError(f"{module.__name__} has no `autocast` to replace; bench/gpu_encoder.py needs updating "
                           "to how the encoders choose their precision now")
    shipped = module.autocast
    module.autocast = lambda device: torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=dtype is torch.bfloat16)
    try:
        yield
    finally:
        module.autocast = shipped


def make_batches(size: int, batch: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` batches of (batch, size, size, 3) uint8: noise upsampled from an 8×8 grid, plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count * batch, 8, 8, 3)).astype(np.float32)
    big = np.repeat(np.repeat(coarse, -(-size // 8), axis=1), -(-size // 8), axis=2)[:, :size, :size]
    images = np.clip(big + rng.normal(0, 12, big.shape), 0, 255).astype(np.uint8)
    return [images[i * batch:(i + 1) * batch] for i in range(count)]


def timed_run(encoder: Encoder, batches: list[np.ndarray], warmup: int) -> tuple[dict, np.ndarray]:
    """(images/s and peak device memory over `batches` after `warmup` untimed batches, the first batch's output)."""
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    first = encoder.encode_dense(batches[0]).cpu().numpy()
    for batch in batches[1:1 + warmup]:
        encoder.encode_dense(batch)
    if encoder.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for batch in batches:
        encoder.encode_dense(batch)
    sync()
    seconds = time.perf_counter() - start
    images = sum(len(b) for b in batches)
    stats = {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)}
    if encoder.device.type == "cuda":
        stats["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return stats, first


def cell_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between a and b (B, C, h, w) at every (image, cell): (B·h·w,)."""
    fa = a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1]).astype(np.float64)
    fb = b.transpose(0, 2, 3, 1).reshape(-1, b.shape[1]).astype(np.float64)
    return (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="clip-vit-b16")
    p.add_argument("--weights", default="untrained")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-mean-cosine", type=float, default=0.999)
    p.add_argument("--min-p01-cosine", type=float, default=0.99)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")

    start = time.perf_counter()
    encoder = load_encoder(EncoderConfig(name=args.encoder, weights=args.weights, device=args.device))
    load_s = time.perf_counter() - start
    batches = make_batches(encoder.spec.image_size, args.batch_size, args.batches)
    encoder.encode_dense(batches[0])  # first call of the process (allocator, kernels): out of every timed run
    runs, outputs = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with precision(encoder, dtype):
            runs[name], outputs[name] = timed_run(encoder, batches, args.warmup)
    runs["shipped"], outputs["shipped"] = timed_run(encoder, batches, args.warmup)
    cos = cell_cosines(outputs["fp32"], outputs["bf16"])
    gap = {k: float(np.abs(outputs["shipped"] - outputs[k]).max()) for k in ("fp32", "bf16")}
    agree = {"cells": int(cos.size), "mean_cosine": round(float(cos.mean()), 6),
             "p01_cosine": round(float(np.quantile(cos, 0.01)), 6), "min_cosine": round(float(cos.min()), 6),
             "max_abs_diff": round(float(np.abs(outputs["fp32"] - outputs["bf16"]).max()), 6)}
    agree["ok"] = agree["mean_cosine"] >= args.min_mean_cosine and agree["p01_cosine"] >= args.min_p01_cosine
    print(json.dumps({
        "encoder": args.encoder, "weights": args.weights, "device": str(encoder.device),
        "device_name": torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "batch_size": args.batch_size, "image_size": encoder.spec.image_size,
        "load_s": round(load_s, 2), "runs": runs,
        "bf16_speedup": round(runs["bf16"]["images_per_s"] / runs["fp32"]["images_per_s"], 3),
        # the shipped path equals one of the two runs bit for bit (same kernels, same batches)
        "shipped_runs": min(gap, key=gap.get), "shipped_max_abs_diff": {k: round(v, 6) for k, v in gap.items()},
        "agreement": agree,
    }, indent=1))
    if not agree["ok"]:
        sys.exit(f"fp32 and bf16 disagree: {agree} (floors: mean {args.min_mean_cosine}, p01 {args.min_p01_cosine})")


if __name__ == "__main__":
    main()
