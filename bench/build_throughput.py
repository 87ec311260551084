"""Build throughput: the whole `build_bank` call, Ray's start included, vs the bare encoder forward pass with every
core on the same batches, one run.

Prints JSON. ratio_end_to_end = (images ÷ wall seconds of Ray's start + build_bank) ÷ bare-forward images/s, the
bare forward running with one torch thread per core after Ray is shut down (the whole machine, as a user without
a pipeline would run it; model load not timed). `stages` says where the wall time goes: Ray's start; until the
first encoder actor has loaded its model (decode runs meanwhile); until the first encoded chunk; encoding; and the
tail after the last encoded chunk (the last parts, publish). ratio_after_ray_init leaves Ray's start out (a build
on a running cluster connects in milliseconds), ratio_steady counts from the first encoded chunk to the last.
Peak RSS and CPU seconds are sampled over this process and every process it started (Ray's workers included).

    python bench/build_throughput.py   # the issue's setup: 2000 images of 224 px, 8 shards, clip-vit-s32-alt
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
import ray
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


class ProcessSampler:
    """Every `interval` s: the summed RSS of this process and its descendants (peak kept), and each process's CPU
    seconds under the role its title showed (Ray names a worker after the task or actor it runs)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop, self._niceness = interval, 0, threading.Event(), 0
        self._cpu: dict[int, tuple[str, float]] = {}  # pid → (role, CPU seconds)
        own = psutil.Process().cpu_times()
        self._own_before = own.user + own.system  # the driver's CPU before the build (imports, the corpus)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    cpu = p.cpu_times()
                    role = self._role(p, me)
                    if role == "EncoderWorker":
                        self._niceness = p.nice()
                except psutil.Error:
                    continue
                known = self._cpu.get(p.pid, ("", 0.0))[0]
                keep = known if role == "idle worker" and known else role  # a worker keeps its busiest role
                self._cpu[p.pid] = (keep, cpu.user + cpu.system - (self._own_before if p.pid == me.pid else 0))
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    @staticmethod
    def _role(p: psutil.Process, me: psutil.Process) -> str:
        if p.pid == me.pid:
            return "driver"
        title = " ".join(p.cmdline()) or p.name()
        for role in ("EncoderWorker", "decode_shard", "write_shard"):
            if role in title:
                return role
        return "idle worker" if "ray::" in title else "ray system (gcs, raylet, agents)"

    @property
    def worker_niceness(self) -> int:
        """The niceness Ray gave the encoder actor's process (the last one seen)."""
        return self._niceness

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per role, summed over processes."""
        out: dict[str, float] = {}
        for role, seconds in self._cpu.values():
            out[role] = round(out.get(role, 0.0) + seconds, 2)
        return dict(sorted(out.items()))

    def __enter__(self) -> "ProcessSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def bare_forward(config: BuildConfig, threads: int, batch_size: int) -> dict:
    """Images/s of encode_dense alone on the build's own batches of `batch_size` (decoded beforehand, not timed)."""
    spec = resolve_spec(config.encoder)
    images = []
    for shard in list_shards(config.source):
        shard_images = []
        for item in iter_samples(shard, config.ingest):
            if isinstance(item, Reject):
                continue
            segments = make_segments(item, config.segments)
            if not isinstance(segments, Reject):
                shard_images.append(prepare_image(item.image, [s.mask for s in segments], spec)[0])
        bs = batch_size  # batches within a shard, as the build forms them
        images += [np.stack(shard_images[i:i + bs]) for i in range(0, len(shard_images), bs)]
    torch.set_num_threads(threads)
    encoder = load_encoder(config.encoder)
    encoder.encode_dense(images[0])  # warm-up, as the build's actor warms up on its first batch
    start = time.perf_counter()
    for batch in images:
        encoder.encode_dense(batch)
    seconds = time.perf_counter() - start
    count = sum(len(b) for b in images)
    return {"images": count, "threads": threads, "seconds": round(seconds, 3),
            "images_per_s": round(count / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", default="clip-vit-s32-alt")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=PipelineConfig.batch_size, help="default: sized by the build")
    parser.add_argument("--batches-per-call", type=int, default=PipelineConfig.batches_per_call,
                        help="default: adaptive (chunks of chunk_bytes, calls sized from the forward time)")
    parser.add_argument("--cpus-per-encoder", type=float, default=None, help="default: sized by the build")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="refbank-bench-")
    make_corpus(f"{work}/corpus", CorpusConfig(shards=args.shards, samples_per_shard=args.samples_per_shard,
                                              image_size=args.image_size, seed=0))
    config = BuildConfig(
        source=f"{work}/corpus/train-*.tar", bank=f"{work}/bank",
        encoder=EncoderConfig(name=args.encoder, weights="untrained"),
        pipeline=PipelineConfig(batch_size=args.batch_size, batches_per_call=args.batches_per_call,
                                cpus_per_encoder=args.cpus_per_encoder),
    )
    load_before = os.getloadavg()
    marks: dict[str, tuple[float, int]] = {}  # first / last encoded chunk: (time, images encoded by then)

    def on_progress(p) -> None:
        if p.images:
            marks.setdefault("first", (time.perf_counter(), p.images))
            if p.images > marks.get("last", (0, 0))[1]:
                marks["last"] = (time.perf_counter(), p.images)

    with ProcessSampler() as rss:
        start = time.perf_counter()
        init_ray()  # what build_bank would do first; timed on its own
        ray_init_s = time.perf_counter() - start
        report = build_bank(config, on_progress=on_progress)
        end = time.perf_counter()
        time.sleep(2 * rss.interval)  # one more sample of every process's CPU time
    if not report.ok:
        sys.exit(f"build failed: {report.failed}")
    niceness = rss.worker_niceness
    ray.shutdown()  # the bare forward gets the machine to itself
    bare = bare_forward(config, threads=os.cpu_count(), batch_size=report.batch_size)
    # Ray runs its workers at a lower priority (niceness 15): with other jobs on the machine the encoder actor
    # gets less CPU than this process would. The same forward at the actor's niceness compares like with like.
    os.nice(niceness - os.nice(0))
    bare_niced = bare_forward(config, threads=os.cpu_count(), batch_size=report.batch_size)
    wall = end - start
    built = start + ray_init_s  # build_bank's own start
    (first_t, first_images), (last_t, last_images) = marks["first"], marks["last"]
    steady = (last_images - first_images) / (last_t - first_t)
    print(json.dumps({
        "encoder": args.encoder, "images": report.samples, "segments": report.segments, "shards": args.shards,
        "batch_size": report.batch_size, "batches_per_call": args.batches_per_call or "adaptive",
        "encoder_calls": report.encoder_calls, "cpus": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "build": {"wall_s": round(wall, 2), "images_per_s": round(report.samples / wall, 2),
                  "startup_s": round(ray_init_s + report.startup_s, 2),  # Ray's start + the first model load
                  "steady_images_per_s": round(steady, 2), "peak_rss_mb": round(rss.peak / 2**20)},
        "stages": {"ray_init_s": round(ray_init_s, 2),
                   "to_first_encoder_loaded_s": round(report.startup_s, 2),  # from build_bank's start
                   "to_first_encoded_chunk_s": round(first_t - built, 2),
                   "encoding_s": round(last_t - first_t, 2),
                   "tail_after_last_chunk_s": round(end - last_t, 2)},
        "cpu_s_by_process": rss.cpu_by_role(),
        "bare_forward": bare,
        "ratio_end_to_end": round(report.samples / wall / bare["images_per_s"], 3),
        "ratio_after_ray_init": round(report.samples / (end - built) / bare["images_per_s"], 3),
        "ratio_steady": round(steady / bare["images_per_s"], 3),
        f"bare_forward_at_worker_niceness_{niceness}": bare_niced,
        "ratio_end_to_end_same_niceness": round(report.samples / wall / bare_niced["images_per_s"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
