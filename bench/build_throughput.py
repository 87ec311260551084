"""Build throughput: the whole Ray build vs the bare encoder forward pass on the same batches, one run.

Prints JSON. ratio = build images/s ÷ bare-forward images/s, where the bare forward runs with the
same torch thread count the encoder actor gets (cpus_per_encoder), so the ratio says how much of
the encoder's time the rest of the pipeline (tar I/O, decode, segments, pooling, Parquet, Ray) costs.
"steady" counts from the first encoded batch to the end, leaving out one-off start-up (model load,
decode worker start, the first batch). Peak RSS is sampled over the driver and every process it
started (Ray's workers included).

    python bench/build_throughput.py --encoder clip-vit-b16 --shards 4 --samples-per-shard 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import psutil
import torch

from bank_builder.config import BuildConfig, EncoderConfig, PipelineConfig
from bank_builder.embed import prepare_image
from bank_builder.encoders import load_encoder, resolve_spec
from bank_builder.ingest import iter_samples, list_shards
from bank_builder.pipeline import build_bank
from bank_builder.ray_runtime import init_ray
from bank_builder.records import Reject
from bank_builder.segments import make_segments
from bank_builder.synthetic import CorpusConfig, make_corpus


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants every `interval` seconds."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bare_forward(config: BuildConfig, threads: int) -> dict:
    """Images/s of encode_dense alone on the build's own batches (decoded beforehand, not timed)."""
    spec = resolve_spec(config.encoder)
    images = []
    for shard in list_shards(config.source):
        for item in iter_samples(shard, config.ingest):
            if isinstance(item, Reject):
                continue
            segments = make_segments(item, config.segments)
            if not isinstance(segments, Reject):
                images.append(prepare_image(item.image, [s.mask for s in segments], spec)[0])
    bs = config.pipeline.batch_size
    batches = [np.stack(images[i:i + bs]) for i in range(0, len(images), bs)]
    torch.set_num_threads(threads)
    encoder = load_encoder(config.encoder)
    encoder.encode_dense(batches[0])  # warm-up, as the build's actor warms up on its first batch
    start = time.perf_counter()
    for batch in batches:
        encoder.encode_dense(batch)
    seconds = time.perf_counter() - start
    return {"images": len(images), "seconds": round(seconds, 3), "images_per_s": round(len(images) / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="clip-vit-b16")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus-per-encoder", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="refbank-bench-")
    make_corpus(f"{work}/corpus", CorpusConfig(shards=args.shards, samples_per_shard=args.samples_per_shard,
                                              image_size=args.image_size, seed=0))
    config = BuildConfig(
        source=f"{work}/corpus/train-*.tar", bank=f"{work}/bank",
        encoder=EncoderConfig(name=args.encoder, weights="untrained"),
        pipeline=PipelineConfig(batch_size=args.batch_size, cpus_per_encoder=args.cpus_per_encoder),
    )
    init_ray(num_cpus=args.num_cpus)
    first: list[tuple[float, int]] = []  # (time, images) at the first encoded batch

    def on_progress(p) -> None:
        if not first and p.images:
            first.append((time.perf_counter(), p.images))

    with PeakRSS() as rss:
        report = build_bank(config, on_progress=on_progress)
    end = time.perf_counter()
    if not report.ok:
        sys.exit(f"build failed: {report.failed}")
    bare = bare_forward(config, threads=max(int(args.cpus_per_encoder), 1))
    # Steady state: from the first encoded batch to the end (publish included). What it leaves out is
    # one-off per build: actor model load, decode worker start-up, the first batch.
    steady = (report.samples - first[0][1]) / (end - first[0][0])
    print(json.dumps({
        "encoder": args.encoder, "images": report.samples, "segments": report.segments,
        "batch_size": args.batch_size, "cpus": args.num_cpus, "cpus_per_encoder": args.cpus_per_encoder,
        "build": {"seconds": round(report.seconds, 2), "startup_s": round(report.startup_s, 2),
                  "images_per_s": round(report.images_per_s, 2), "segments_per_s": round(report.segments_per_s, 2),
                  "first_batch_s": round(report.seconds - (end - first[0][0]), 2),
                  "steady_images_per_s": round(steady, 2),
                  "peak_rss_mb": round(rss.peak / 2**20)},
        "bare_forward": bare,
        "ratio_end_to_end": round(report.images_per_s / bare["images_per_s"], 3),
        "ratio_steady": round(steady / bare["images_per_s"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
