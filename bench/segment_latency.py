"""Segmentation latency: `Segmenter.vocabulary` on held-out images of a small real bank ÷ the bare encoder forward.

    python bench/segment_latency.py                      # ViT-B-32 architecture, untrained weights
    python bench/segment_latency.py --encoder tiny-clip --quick

A small real bank (generated corpus, `build_bank` with --encoder, untrained weights, then `build_index`), opened
as the service opens it. Latency p50 / p99 of the vocabulary call ÷ the bare `encoder.encode_dense` forward of the
same single image, p50 ÷ p50 and p99 ÷ p99 (target: both ≤ 1.25). The rest of the call is timed piece by piece
on the same images (superpixels, resize + soft masks, forward, pooling, scoring + result assembly), so the
ratio is explained. One torch thread by default (--torch-threads): both sides of the ratio run alike, and on a
small shared machine more threads measure the scheduler. With --compare-regions A,B (region presets,
query.regions.REGION_PRESETS), the whole vocabulary call is also timed per preset on the same images, presets
alternating, e.g. `--compare-regions superpixel,refined` for what the per-pixel refinement costs. With
--compare-modes, each query mode's whole call (vocabulary, open set, foreground, and reference with a mask
prompt: the largest ground-truth segment of the previous held-out image, whose image the call encodes too) is
timed on the same images, modes alternating, ÷ the bare forward. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import bench_common  # noqa: E402 - first: it takes this folder off the path (bench/query.py shadows `query`)

bench_common.leave_bench_folder()
ms = bench_common.ms

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from bank_builder.config import BuildConfig, EncoderConfig, IngestConfig, PipelineConfig  # noqa: E402
from bank_builder.embed import pool_segments, prepare_image  # noqa: E402
from bank_builder.encoders import load_encoder  # noqa: E402
from bank_builder.index import IndexConfig, build_index  # noqa: E402
from bank_builder.ingest import iter_samples  # noqa: E402
from bank_builder.pipeline import build_bank  # noqa: E402
from bank_builder.ray_runtime import init_ray  # noqa: E402
from bank_builder.records import Reject  # noqa: E402
from bank_builder.synthetic import CorpusConfig, class_names, make_corpus  # noqa: E402
from query.bank import open_bank  # noqa: E402
from query.regions import Reference, RegionConfig, Regions, region_masks, region_preset  # noqa: E402
from query.search import BankSearcher  # noqa: E402
from query.segment import Segmenter  # noqa: E402
from query.serving import encoder_config, label_table  # noqa: E402

QUICK = {"seg_shards": 1, "seg_samples_per_shard": 8, "seg_heldout_shards": 1, "image_size": 128, "seg_rounds": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/segment", help="where the bank is kept between runs")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads; 0 = torch's default (all cores)")
    p.add_argument("--encoder", default="clip-vit-b32", help="e.g. clip-vit-b32, tiny-clip (untrained weights)")
    p.add_argument("--seg-shards", type=int, default=2)
    p.add_argument("--seg-samples-per-shard", type=int, default=16)
    p.add_argument("--seg-heldout-shards", type=int, default=1)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seg-rounds", type=int, default=5, help="passes over the held-out images")
    p.add_argument("--compare-regions", default=None, help="comma-separated region presets to time the whole "
                                                            "vocabulary call with, e.g. superpixel,refined")
    p.add_argument("--compare-modes", action="store_true", help="also time the open-set, foreground and reference "
                                                                 "calls beside vocabulary (superpixel regions)")
    return bench_common.parse_with_quick(p, QUICK, argv)


def pct(samples: list[float]) -> dict:
    """p50 / p99 / mean of seconds, in ms."""
    a = np.asarray(samples)
    return {"p50_ms": ms(np.percentile(a, 50)), "p99_ms": ms(np.percentile(a, 99)), "mean_ms": ms(a.mean())}


def ensure_seg_bank(args: argparse.Namespace) -> tuple[str, list[str], dict]:
    """(bank URL, held-out shard URLs, what was done): corpus + build_bank + build_index, reused per shape."""
    shape = {"encoder": args.encoder, "shards": args.seg_shards, "samples_per_shard": args.seg_samples_per_shard,
             "heldout_shards": args.seg_heldout_shards, "image_size": args.image_size}
    root = os.path.abspath(os.path.join(args.out, "seg-{encoder}-{shards}x{samples_per_shard}-{image_size}px"
                                        .format(**shape)))
    marker, bank = os.path.join(root, "bench.json"), os.path.join(root, "bank")
    if os.path.exists(marker) and json.load(open(marker))["shape"] == shape:
        saved = json.load(open(marker))
        return bank, saved["heldout"], {"reused": True}
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    summary = make_corpus(os.path.join(root, "corpus"), CorpusConfig(
        shards=args.seg_shards, samples_per_shard=args.seg_samples_per_shard, image_size=args.image_size,
        heldout_shards=args.seg_heldout_shards, seed=0))
    config = BuildConfig(source=os.path.join(root, "corpus", "train-*.tar"), bank=bank,
                         encoder=EncoderConfig(name=args.encoder, weights="untrained", seed=0),
                         pipeline=PipelineConfig(batch_size=8, progress_interval_s=0.0))
    init_ray(num_cpus=os.cpu_count())
    try:
        report = build_bank(config)
        if not report.ok:
            sys.exit(f"build failed: {report.failed}")
        indexed = build_index(bank, IndexConfig(autotune_queries=50, nprobe_candidates=(1, 4, 16)))
    finally:
        ray.shutdown()
    json.dump({"shape": shape, "heldout": summary.heldout}, open(marker, "w"))
    return bank, summary.heldout, {"reused": False, "build_s": round(time.perf_counter() - t, 2),
                                   "segments": report.segments, "index": indexed.factory}


def segmentation(args: argparse.Namespace) -> dict:
    bank_url, heldout, built = ensure_seg_bank(args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    bank = open_bank(bank_url)
    encoder = load_encoder(encoder_config(bank.manifest.encoder))  # as the service loads it
    spec = encoder.spec
    searcher = BankSearcher(bank)
    segmenter = Segmenter(encoder, searcher, bank, label_table(bank), RegionConfig())
    samples = [s for shard in heldout for s in iter_samples(shard, IngestConfig()) if not isinstance(s, Reject)]
    images = [s.image for s in samples]
    classes = list(class_names())
    inputs = [prepare_image(image, [], spec)[0][None] for image in images]  # the forward's own (1, S, S, 3) input

    t = time.perf_counter()
    segmenter.vocabulary(images[0], classes)  # first call: encodes the class names' text (cached after)
    first_s = time.perf_counter() - t
    encoder.encode_dense(inputs[0])
    names = ["vocabulary", "bare_forward", "superpixels", "resize_and_soft_masks", "forward", "pooling",
             "score_and_assemble"]
    times: dict[str, list[float]] = {n: [] for n in names}
    regions_per_image = []

    def clock(name, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        times[name].append(time.perf_counter() - t0)
        return out

    for r in range(args.seg_rounds):
        for i, image in enumerate(images):
            order = (0, 1) if (r + i) % 2 == 0 else (1, 0)  # alternate which of the two goes first
            for which in order:
                if which == 0:
                    clock("vocabulary", segmenter.vocabulary, image, classes)
                else:
                    clock("bare_forward", encoder.encode_dense, inputs[i])
            # The vocabulary call, piece by piece (what image_regions + vocabulary do, in order).
            masks = clock("superpixels", region_masks, image, segmenter.region_config, spec.grid)
            resized, soft = clock("resize_and_soft_masks", prepare_image, image, list(masks), spec)
            features = clock("forward", encoder.encode_dense, resized[None])
            with torch.inference_mode():
                visual, _ = clock("pooling", pool_segments, features, torch.as_tensor(soft),
                                  torch.zeros(len(masks), dtype=torch.int64))
            clock("score_and_assemble", segmenter.vocabulary, Regions(masks, visual.astype(np.float32)), classes)
            if r == 0:
                regions_per_image.append(len(masks))
    stats = {n: pct(v) for n, v in times.items()}
    p50 = {n: s["p50_ms"] for n, s in stats.items()}
    parts_sum = sum(p50[n] for n in names[2:])
    return {
        "encoder": spec.name, "untrained": spec.untrained, "encoder_input": spec.image_size,
        "bank": {"url": bank_url, "segments": bank.manifest.totals["segments"], **built},
        "images": len(images), "image_size": args.image_size, "rounds": args.seg_rounds, "classes": len(classes),
        "regions_per_image_mean": round(float(np.mean(regions_per_image)), 1),
        "torch_threads": torch.get_num_threads(), "first_call_ms": ms(first_s),
        "latency": stats,
        "ratio_p50": round(p50["vocabulary"] / p50["bare_forward"], 3),
        "ratio_p99": round(stats["vocabulary"]["p99_ms"] / stats["bare_forward"]["p99_ms"], 3),
        "ratio_p99_over_forward_p50": round(stats["vocabulary"]["p99_ms"] / p50["bare_forward"], 3),
        "target_met": max(p50["vocabulary"] / p50["bare_forward"],
                          stats["vocabulary"]["p99_ms"] / stats["bare_forward"]["p99_ms"]) <= 1.25,
        "share_of_vocabulary_p50": {n: round(p50[n] / p50["vocabulary"], 3) for n in names[2:]},
        "pieces_p50_sum_ms": round(parts_sum, 3),
        **({"regions": compare_regions(args, segmenter, images, classes)} if args.compare_regions else {}),
        **({"modes": compare_modes(args, segmenter, samples, classes, inputs)} if args.compare_modes else {}),
    }


def _alternating(calls: dict, images: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of each named call(i) on every image index, `rounds` times; the call that goes first rotates image
    by image, so no call always runs on a warm or a cold cache."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(images):
            for n in names[(r + i) % len(names):] + names[:(r + i) % len(names)]:
                t0 = time.perf_counter()
                calls[n](i)
                times[n].append(time.perf_counter() - t0)
    return times


def compare_regions(args: argparse.Namespace, base: Segmenter, images: list[np.ndarray], classes: list[str]) -> dict:
    """Per region preset: p50 / p99 / mean ms of the whole `Segmenter.vocabulary` call and the regions (pieces,
    with refinement) of its answers, presets alternating image by image; ratios to the first preset."""
    names = args.compare_regions.split(",")
    segmenters = {n: Segmenter(base.encoder, base.searcher, base.metadata, base.table, region_preset(n))
                  for n in names}
    for segmenter in segmenters.values():
        segmenter.vocabulary(images[0], classes)  # text cached, as after the first request
    pieces: dict[str, list[int]] = {n: [] for n in names}

    def call(n: str, i: int) -> None:
        pieces[n].append(len(segmenters[n].vocabulary(images[i], classes).regions))

    times = _alternating({n: (lambda i, n=n: call(n, i)) for n in names}, len(images), args.seg_rounds)
    stats = {n: {**pct(times[n]), "regions_mean": round(float(np.mean(pieces[n])), 1)} for n in names}
    first = stats[names[0]]
    for n in names[1:]:
        stats[n]["ratio_p50"] = round(stats[n]["p50_ms"] / first["p50_ms"], 3)
        stats[n]["ratio_p99"] = round(stats[n]["p99_ms"] / first["p99_ms"], 3)
    return stats


def _largest_segment(sample) -> Reference:
    """A mask prompt: the sample's largest ground-truth segment, labelled with its class."""
    entries = sample.meta["segments"]
    sizes = [int((sample.mask == e["id"]).sum()) for e in entries]
    entry = entries[int(np.argmax(sizes))]
    return Reference(sample.image, mask=sample.mask == entry["id"], label=entry["label"])


def compare_modes(args: argparse.Namespace, segmenter: Segmenter, samples: list, classes: list[str],
                  inputs: list[np.ndarray]) -> dict:
    """Per query mode: p50 / p99 / mean ms of the whole call on each held-out image, modes and the bare forward
    alternating image by image; ratios to the bare forward (p50 ÷ p50, p99 ÷ p99)."""
    references = [_largest_segment(samples[i - 1]) for i in range(len(samples))]  # another image's object
    calls = {
        "vocabulary": lambda i: segmenter.vocabulary(samples[i].image, classes),
        "open_set": lambda i: segmenter.open_set(samples[i].image),
        "foreground": lambda i: segmenter.foreground(samples[i].image),
        "reference": lambda i: segmenter.reference(samples[i].image, [references[i]]),
        "bare_forward": lambda i: segmenter.encoder.encode_dense(inputs[i]),
    }
    for call in calls.values():
        call(0)  # text and prototypes cached, as after the first request
    names = list(calls)
    times = _alternating(calls, len(samples), args.seg_rounds)
    stats = {n: pct(times[n]) for n in names}
    for n in names[:-1]:
        stats[n]["ratio_p50"] = round(stats[n]["p50_ms"] / stats["bare_forward"]["p50_ms"], 3)
        stats[n]["ratio_p99"] = round(stats[n]["p99_ms"] / stats["bare_forward"]["p99_ms"], 3)
    return stats


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    out = {"config": vars(args), "cpus": os.cpu_count(), "segmentation": segmentation(args)}
    out["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
