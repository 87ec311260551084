"""Incremental refresh, one run: a full index build, then 5% new vectors added as a delta; results against one
monolithic faiss index of base + delta; a following service switching versions under load on 127.0.0.1.

    python bench/refresh.py                   # 1M x 64 base, 50k new vectors
    python bench/refresh.py --vectors 100000  # smaller

Sections of the JSON it prints:
  build    seconds of the full build (train + add + lists + autotune, on a fresh local Ray) and of the
           incremental one (add + lists + label table), both with Ray's start-up left out, and their ratio
           (target ≤ 0.10); the delta's drift report.
  results  recall@10 and how many ids equal one monolithic faiss index holding base + delta with the same
           quantizer (the index's own trained object), on fresh queries.
  swap     a service under --clients threads of batch-1 /v1/search requests (vector queries) switches to a
           refreshed version (another delta, built and published beforehand with no load on) in the middle of
           the load, by the switch `--follow` makes when CURRENT moves: latency p50 / p99 before the switch and
           from it until --after seconds later; failed requests.
The base bank is bench/synthetic_bank.py's (written once per shape under --out); the new vectors are more parts
drawn around the same cluster centers. The service loads the tiny-clip architecture (seeded weights) as the
bank's encoder: /v1/search with vectors never runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import threading
import time
import urllib.request

import numpy as np

import bench_common  # noqa: E402 - first: it takes this folder off the path (bench/query.py shadows `query`)

bench_common.leave_bench_folder()
synthetic = bench_common.sibling("synthetic_bank")
peers = bench_common.sibling("query_peers")

import ray  # noqa: E402

from bank_builder.config import EncoderConfig  # noqa: E402
from bank_builder.encoders import resolve_spec  # noqa: E402
from bank_builder.format import BankRef, make_manifest, publish, read_current  # noqa: E402
from bank_builder.format import read_manifest  # noqa: E402
from bank_builder.index import IndexConfig, build_index  # noqa: E402
from bank_builder.index.autotune import recall_at_k  # noqa: E402
from bank_builder.ray_runtime import init_ray  # noqa: E402
from query.bank import open_bank  # noqa: E402
from query.search import BankSearcher  # noqa: E402

QUICK = {"vectors": 100_000, "parts": 10, "clusters": 200, "factory": "IVF1024,PQ32", "queries": 300, "before": 5,
         "after": 5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/refresh")
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64, help="64: the tiny-clip encoder the service loads")
    p.add_argument("--parts", type=int, default=50)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.25)
    p.add_argument("--factory", default="IVF4096,PQ32")
    p.add_argument("--new-share", type=float, default=0.05, help="new vectors, as a share of the base")
    p.add_argument("--new-parts", type=int, default=3)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--clients", type=int, default=4, help="threads sending requests during the swap section")
    p.add_argument("--before", type=float, default=10.0, help="seconds of load before the refresh is published")
    p.add_argument("--after", type=float, default=10.0, help="seconds of load after the service switched")
    return bench_common.parse_with_quick(p, QUICK, argv)


def fresh_bank(args: argparse.Namespace) -> tuple[str, np.ndarray]:
    """A copy of the shared synthetic base bank, its encoder spec set to what the service will load."""
    base, centers = synthetic.ensure_bank(args.out, args.vectors, args.dim, args.parts, args.clusters, args.spread)
    work = os.path.join(args.out, f"run-{args.vectors}x{args.dim}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    ref = BankRef(work)
    spec = resolve_spec(EncoderConfig(name="tiny-clip", weights="untrained", seed=0)).to_dict()
    m = read_manifest(ref)
    publish(ref, m.with_(encoder=spec, dims={**m.dims, "visual": spec["visual_dim"]}), read_current(ref))
    return work, centers


def add_new_parts(bank: str, centers: np.ndarray, args: argparse.Namespace) -> None:
    """Write --new-share of the base as --new-parts more parts and publish them with the index carried over."""
    ref = BankRef(bank)
    m = read_manifest(ref)
    total = int(args.new_share * args.vectors)
    sizes = np.diff(np.linspace(0, total, args.new_parts + 1).astype(int))
    rng = np.random.default_rng(99 + len(m.parts))
    infos = m.parts + synthetic.write_parts(ref, rng, centers, sizes, len(m.parts), "new", args.spread)
    body = make_manifest(infos, m.encoder, m.fingerprint, m.build).with_(index=m.index, dims=m.dims)
    publish(ref, body, read_current(ref))


def build_section(bank: str, centers: np.ndarray, args: argparse.Namespace) -> dict:
    config = IndexConfig(factory=args.factory, flat_below=0, refine=True, refine_factor=4)
    init_ray()  # started once, before both builds: its start-up is in neither figure
    full = build_index(bank, config, retrain=True)  # from scratch even if the base bank was indexed before
    add_new_parts(bank, centers, args)
    delta = build_index(bank, config)
    ray.shutdown()
    full_s = full.timings_s["total"]
    delta_s = delta.timings_s["total"]
    return {"full_s": full_s, "full_stages_s": full.timings_s, "delta_s": delta_s, "delta_stages_s": delta.timings_s,
            "ratio": round(delta_s / full_s, 4), "target_met": delta_s / full_s <= 0.10,
            "delta": delta.delta, "versions": {"full": full.version, "delta": delta.version}}


def results_section(bank: str, centers: np.ndarray, args: argparse.Namespace) -> dict:
    x, ids = synthetic.read_all(bank)
    mono = peers.Monolithic(bank, x, ids)
    del x, ids
    queries = synthetic.clustered(np.random.default_rng(7), centers, args.queries, args.spread)
    truth = synthetic.ground_truth(bank, queries, 10)
    searcher = BankSearcher(open_bank(bank))
    got, want = searcher.search(queries, 10, args.nprobe, 4), mono.search(queries, 10, args.nprobe, 4)
    return {"ids_equal_monolithic": round(float(np.mean(got[1] == want[1])), 5),
            "recall_at_10": round(recall_at_k(got[1], truth), 4),
            "monolithic_recall_at_10": round(recall_at_k(want[1], truth), 4)}


def swap_section(bank: str, centers: np.ndarray, args: argparse.Namespace) -> dict:
    """A service on the current version under load; a refresh (another delta) is built and published beforehand
    with no load on, then the service switches to it (POST /admin/reload: the same switch --follow makes when it
    sees CURRENT move) in the middle of the load. Latencies before and from the switch on."""
    import uvicorn

    from query.service import ServiceConfig, create_app

    served = read_manifest(BankRef(bank)).version
    app = create_app(ServiceConfig(bank=bank, version=served, memory_bytes=8 << 30))
    app.state.service.load()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    add_new_parts(bank, centers, argparse.Namespace(**{**vars(args), "new_share": args.new_share / 5,
                                                       "new_parts": 1}))
    init_ray()
    refreshed = build_index(bank, IndexConfig(factory=args.factory, flat_below=0, refine=True, refine_factor=4))
    ray.shutdown()
    queries = synthetic.clustered(np.random.default_rng(8), centers, 256, args.spread)
    samples: list[tuple[float, float, bool]] = []  # (start, seconds, ok)
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            body = json.dumps({"vector": queries[rng.integers(len(queries))].tolist(), "k": 10}).encode()
            request = urllib.request.Request(f"{url}/v1/search", body, {"Content-Type": "application/json"})
            start = time.perf_counter()
            try:
                urllib.request.urlopen(request, timeout=60).read()
                samples.append((start, time.perf_counter() - start, True))
            except Exception:  # noqa: BLE001 - a failed request is what this section counts
                samples.append((start, time.perf_counter() - start, False))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.before)
    switch_at = time.perf_counter()
    answer = json.loads(urllib.request.urlopen(urllib.request.Request(f"{url}/admin/reload", b"", method="POST"),
                                               timeout=600).read())
    switched_at = time.perf_counter()
    time.sleep(args.after)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    server.should_exit = True
    before = [s for start, s, ok in samples if start < switch_at and ok]
    during = [s for start, s, ok in samples if switch_at <= start and ok]
    p99 = lambda xs: float(np.percentile(xs, 99))  # noqa: E731
    summary = lambda xs: {"n": len(xs), "p50_ms": bench_common.ms(np.median(xs)),  # noqa: E731
                          "p99_ms": bench_common.ms(p99(xs))}
    return {"from": served, "to": answer["version"], "expected": refreshed.version,
            "requests": len(samples), "failed": sum(not ok for _, _, ok in samples),
            "before": summary(before), "during": summary(during), "p99_ratio": round(p99(during) / p99(before), 3),
            "target_met": p99(during) <= 2 * p99(before), "switch_s": round(switched_at - switch_at, 3)}


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    bank, centers = fresh_bank(args)
    out = {"config": vars(args), "cpus": os.cpu_count(), "bank": bank}
    out["build"] = build_section(bank, centers, args)
    out["results"] = results_section(bank, centers, args)
    out["swap"] = swap_section(bank, centers, args)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
