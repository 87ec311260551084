"""What one request costs the query service, and whether a heavy one stalls light ones, one run.

    PYTHONPATH=. python bench/service_requests.py --bank /path/to/bank      # a built and indexed bank
    PYTHONPATH=. python bench/service_requests.py --out /tmp/refbank-bench  # builds a small bank there first

(from the repository root: the server and the PNG header come from the test suite's helpers.)

Prints one JSON document:

per_request  For each --sides S: a vocabulary segmentation of an S x S PNG (a 128 px image scaled up, nearest)
             answered with JSON + label map + overlay, run by the service's own code (`answers.segment_answer` on a
             loaded `ServiceState`) in a fresh process: wall seconds (best of --repeat) and the peak resident memory
             it added (ru_maxrss after − before, MiB), with the service's per-phase timings (decode, segment, render).
refused      Seconds to answer a 68-byte PNG header that claims 1 x 40,000,000 pixels (413 from the header).
contention   On a real uvicorn server: one S x S segmentation (the largest side) while text searches run one after
             another; their latencies (median, max) ÷ the heavy request's wall time, and whether they all ended
             before it did.
Figures on a shared machine are noisy; the ratios are taken inside one run.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", help="a built and indexed bank (default: build a small one under --out)")
    parser.add_argument("--out", default="/tmp/refbank-bench-service", help="where the small bank is built")
    parser.add_argument("--sides", type=int, nargs="+", default=[1000, 2000, 4096])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--light", type=int, default=20, help="text searches during the heavy request")
    args = parser.parse_args()
    bank = args.bank or small_bank(args.out)
    image = corpus_image()
    context = multiprocessing.get_context("spawn")  # a fresh process per size: its peak memory is its own
    with context.Pool(1, maxtasksperchild=1) as pool:
        per_request = {side: pool.apply(measure_request, (bank, image, side, args.repeat)) for side in args.sides}
    report = {"bank": bank, "per_request": per_request, "refused": refused_seconds(bank),
              "contention": contention(bank, image, max(args.sides), args.light)}
    print(json.dumps(report, indent=2))


def small_bank(out: str) -> str:
    """The test suite's bank: 2 x 16 generated 128 px images, tiny-clip with seeded untrained weights, indexed."""
    bank = os.path.join(out, "bank")
    if os.path.exists(os.path.join(bank, "CURRENT")):
        return bank
    import ray

    from bank_builder.config import BuildConfig, EncoderConfig, PipelineConfig, SegmentConfig
    from bank_builder.index import IndexConfig, build_index
    from bank_builder.pipeline import build_bank
    from bank_builder.synthetic import CorpusConfig, make_corpus

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    make_corpus(os.path.join(out, "corpus"), CorpusConfig(shards=2, samples_per_shard=16, image_size=128, seed=5))
    build_bank(BuildConfig(source=os.path.join(out, "corpus", "train-*.tar"), bank=bank,
                           segments=SegmentConfig(min_area=32),
                           encoder=EncoderConfig(name="tiny-clip", weights="untrained", seed=0),
                           pipeline=PipelineConfig(batch_size=4, progress_interval_s=0.0)))
    build_index(bank, IndexConfig(autotune_queries=50, nprobe_candidates=(1, 4, 16)))
    ray.shutdown()
    return bank


def corpus_image() -> np.ndarray:
    """A 128 px stand-in photo: seeded 8 px blocks of colour noise (it compresses about as a scaled-up photo)."""
    rng = np.random.default_rng(0)
    return np.repeat(np.repeat(rng.integers(0, 256, (16, 16, 3), np.uint8), 8, axis=0), 8, axis=1)


def scaled_png(image: np.ndarray, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def measure_request(bank: str, image: np.ndarray, side: int, repeat: int) -> dict:
    """Seconds and added peak memory of one S x S segmentation, run by the service's code in this process."""
    from query.answers import segment_answer
    from query.api_models import SegmentOptions
    from query.serving import ServiceConfig, ServiceState

    state = ServiceState(ServiceConfig(bank=bank))
    state.load()
    options = SegmentOptions.model_validate({"classes": ["cat", "grass", "sky"],
                                             "return": ["json", "label_map", "overlay"]})
    segment_answer(state, state.live, {"image": scaled_png(image, 64)}, options)  # warm: lists, text, torch
    data = scaled_png(image, side)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, timings = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        answer = segment_answer(state, state.live, {"image": data}, options)
        seconds.append(time.perf_counter() - start)
        timings = json.loads(answer.body)["timings_ms"]
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"pixels": side * side, "png_bytes": len(data), "seconds": round(min(seconds), 3),
            "peak_added_mib": round(added, 1), "timings_ms": timings}


def refused_seconds(bank: str) -> dict:
    from query.serving import ApiError, decode_image
    from tests.service_fixtures import png_header

    data = png_header(1, 40_000_000)
    start = time.perf_counter()
    try:
        decode_image(data, 4096 * 4096)
        status = 200
    except ApiError as exc:
        status = exc.status
    return {"header_bytes": len(data), "status": status, "seconds": round(time.perf_counter() - start, 6)}


def contention(bank: str, image: np.ndarray, side: int, light: int) -> dict:
    """One heavy segmentation on a real server while text searches run back to back."""
    from query.client import RefbankClient
    from query.serving import ServiceConfig
    from tests.service_fixtures import multipart, serving

    with serving(ServiceConfig(bank=bank)) as (server, client):
        client.search(text="warm", k=5)
        body, kind = multipart({"image": scaled_png(image, side)},
                               {"options": json.dumps({"classes": ["cat", "grass"], "return": ["json", "overlay"]})})
        heavy: dict = {}

        def run_heavy() -> None:
            start = time.perf_counter()
            request = urllib.request.Request(server.url + "/v1/segment", data=body, headers={"Content-Type": kind})
            with urllib.request.urlopen(request, timeout=600) as response:
                response.read()
            heavy["end"], heavy["seconds"] = time.perf_counter(), time.perf_counter() - start

        thread = threading.Thread(target=run_heavy)
        thread.start()
        time.sleep(0.2)
        latencies, ends = [], []
        searcher = RefbankClient(server.url, timeout=600)
        for i in range(light):
            start = time.perf_counter()
            searcher.search(text=["cat", "grass", "moon", "brick"][i % 4], k=5)
            ends.append(time.perf_counter())
            latencies.append(ends[-1] - start)
        thread.join()
    return {"side": side, "heavy_seconds": round(heavy["seconds"], 3),
            "light_median_seconds": round(statistics.median(latencies), 4),
            "light_max_seconds": round(max(latencies), 4),
            "light_median_over_heavy": round(statistics.median(latencies) / heavy["seconds"], 4),
            "light_max_over_heavy": round(max(latencies) / heavy["seconds"], 4),
            "all_light_ended_first": max(ends) < heavy["end"]}


if __name__ == "__main__":
    main()
