"""Driver scale: how many images per second the build's driver dispatches as encoder actors grow, on a
ray.cluster_utils.Cluster of nodes declaring fake GPUs, with bench/driver_stand_in.py in place of decode and the
encoder (a stand-in "GPU" of a set speed, one-pixel images), so what is measured is the driver, Ray's calls and
the part writes, not decoding or a model.

Prints JSON: per actor count, images/s and encoder calls/s and forward batches/s between the first and the last
encoded chunk, and the driver process's CPU seconds (psutil, all its threads) per second of that window, i.e.
the cores the driver used. Every process of the cluster runs on this one machine, so the stand-in actors, decode
tasks, writers and raylets share its cores with the driver; the driver's CPU per image is the figure that carries
over to a real cluster.

    python bench/driver_scale.py --nodes 4 --gpus-per-node 8 --actors 1,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
# Ray's workers import the stand-in module by name; this folder goes last so the repository's packages win.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), HERE] if p)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE] + [HERE]

import psutil  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from bank_builder.config import BuildConfig, EncoderConfig, PipelineConfig  # noqa: E402
from bank_builder.pipeline import build_bank  # noqa: E402
from driver_stand_in import SPEED_ENV  # noqa: E402


def one_run(work: str, actors: int, shards: int, images_per_shard: int, pipeline: dict) -> dict:
    """Build a bank of `shards` stand-in shards with `actors` stand-in encoders; the dispatch figures."""
    source = os.path.join(work, f"src-{actors}")
    os.makedirs(source)
    for i in range(shards):
        with open(os.path.join(source, f"shard-{i:05d}.tar"), "wb") as f:
            f.truncate(images_per_shard)  # the stand-in decode reads the size as the image count
    me = psutil.Process()
    marks: dict[str, tuple[float, int, float]] = {}  # first / last encoded chunk: (time, images, driver CPU s)

    def on_progress(p) -> None:
        if p.images and p.images > marks.get("last", (0, 0, 0))[1]:
            cpu = me.cpu_times()
            mark = (time.perf_counter(), p.images, cpu.user + cpu.system)
            marks.setdefault("first", mark)
            marks["last"] = mark

    config = BuildConfig(source=os.path.join(source, "*.tar"), bank=os.path.join(work, f"bank-{actors}"),
                         encoder=EncoderConfig(name="clip-vit-b16", weights="untrained"),
                         pipeline=PipelineConfig(num_encoders=actors, stand_in="driver_stand_in",
                                                 progress_interval_s=0.0, **pipeline))
    start = time.perf_counter()
    report = build_bank(config, on_progress=on_progress)
    wall = time.perf_counter() - start
    if not report.ok:
        raise SystemExit(f"build failed: {report.failed}")
    (t0, i0, c0), (t1, i1, c1) = marks["first"], marks["last"]
    seconds, images = t1 - t0, i1 - i0
    per_call = report.samples / max(report.encoder_calls, 1)  # images a call, over the whole build
    return {"actors": actors, "images": report.samples, "wall_s": round(wall, 2), "window_s": round(seconds, 2),
            "images_per_s": round(images / seconds), "calls_per_s": round(images / per_call / seconds, 1),
            "images_per_call": round(per_call, 1), "batches_per_s": round(images / report.batch_size / seconds, 1),
            "driver_cores": round((c1 - c0) / seconds, 3),
            "driver_cpu_us_per_image": round(1e6 * (c1 - c0) / images, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs: decode and write tasks")
    parser.add_argument("--actors", default="1,2,4,8,16,32")
    parser.add_argument("--images-per-shard", type=int, default=4096)
    parser.add_argument("--shards-per-actor", type=int, default=2)
    parser.add_argument("--min-shards", type=int, default=8)
    parser.add_argument("--speed", type=float, default=0.0, help="images/s of each stand-in GPU; 0: no sleep")
    parser.add_argument("--batch-size", type=int, default=PipelineConfig.batch_size, help="default: sized by the build")
    parser.add_argument("--batches-per-call", type=int, default=PipelineConfig.batches_per_call,
                        help="default: adaptive (bank_builder.batching)")
    args = parser.parse_args()
    os.environ[SPEED_ENV] = str(args.speed)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, num_gpus=args.gpus_per_node)
    ray.init(address=cluster.address, log_to_driver=False)
    work = tempfile.mkdtemp(prefix="refbank-driver-scale-")
    pipeline = {"batch_size": args.batch_size, "batches_per_call": args.batches_per_call}
    runs = []
    try:
        for actors in [int(a) for a in args.actors.split(",")]:
            shards = max(args.min_shards, args.shards_per_actor * actors)
            runs.append(one_run(work, actors, shards, args.images_per_shard, pipeline))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "cpus_per_node": args.cpus_per_node,
                      "machine_cores": os.cpu_count(), "speed_per_actor": args.speed, **pipeline,
                      "images_per_shard": args.images_per_shard, "load_average": os.getloadavg(), "runs": runs},
                     indent=1))


if __name__ == "__main__":
    main()
