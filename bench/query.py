"""kNN through the list cache, one run: refbank beside one monolithic faiss index and LanceDB on the same data.

    python bench/query.py                      # 1M x 64, IVF4096,PQ32, refine x4, nprobe 8, 1000 queries
    python bench/query.py --quick              # 100k vectors: a few minutes
    python bench/query.py --no-lancedb --no-s3 # refbank and monolithic faiss only

The bank is bench/synthetic_bank.py's (clustered Parquet parts, written once per shape under --out); refbank's
index is built once per configuration and reused, and so is LanceDB's table (IVF_PQ, the same partitions,
sub-vectors and refine factor, dot product). Queries are fresh draws around the bank's cluster centers, not bank
vectors. Sections of the JSON it prints:

  recall   recall@10 against exact search, and how often refbank's ids equal the monolithic index's.
  cold     the first query after open, local disk: bytes read at open (quantizer + directory, once) and by the
           query, against the bytes of the lists it probes; latency; median over --cold-trials fresh opens with
           other queries. LanceDB: the same (bytes read through the process's read calls, /proc io counters).
           `per_candidate`: the refine vectors fetched per candidate by range instead of with their lists.
  cold_s3  the same on the moto S3 server on 127.0.0.1: GET requests and bytes of open and of the first query.
  budget   a list budget of --budget-share of the index: batch-1 QPS on a stream drawn from one region of the
           bank (queries around --region-clusters neighbouring cluster centers, spread --region-spread; one stream
           per size given, each with the bytes of the lists it touches against the budget) and on a uniform stream (first pass, then steady), the bytes of the lists each stream touches, resident bytes
           sampled after every query; against the whole-index QPS and LanceDB's on the same streams.
  warm     a budget that holds the index, every list resident: QPS of refbank ÷ the monolithic index (batch 1
           and 64), ids equal.
Ratios are taken inside this run; timed variants alternate, the best of --repeat counts. faiss runs on
--threads threads (1 by default: on a small shared machine more threads measure the scheduler); LanceDB uses
its own thread pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import faiss
import numpy as np
import psutil

import bench_common  # noqa: E402 - first: it takes this folder off the path

bench_common.leave_bench_folder()
synthetic = bench_common.sibling("synthetic_bank")
peers = bench_common.sibling("query_peers")
ms = bench_common.ms

from bank_builder.config import config_to_dict  # noqa: E402
from bank_builder.format import BankRef, read_manifest  # noqa: E402
from bank_builder.index import IndexConfig, build_index  # noqa: E402
from bank_builder.index.autotune import recall_at_k  # noqa: E402
from query.bank import open_bank  # noqa: E402
from query.lists import CacheConfig  # noqa: E402
from query.search import BankSearcher  # noqa: E402

QUICK = {"vectors": 100_000, "parts": 10, "clusters": 200, "factory": "IVF1024,PQ32", "queries": 500,
         "stream": 1000, "repeat": 2, "cold_trials": 5, "region_clusters": [2, 4, 8]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/query", help="where banks and peer tables are kept between runs")
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--parts", type=int, default=50)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.25)
    p.add_argument("--factory", default="IVF4096,PQ32")
    p.add_argument("--refine-factor", type=int, default=4)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and warm QPS")
    p.add_argument("--stream", type=int, default=2000, help="queries per stream in the budget section")
    p.add_argument("--region-clusters", type=int, nargs="+", default=[5, 10, 20],
                   help="sizes of the regional streams, one stream each: clusters it is drawn from (the cluster of a "
                   "random center and its nearest neighbours); the JSON says which fit the budget")
    p.add_argument("--region-spread", type=float, default=0.5, help="spread of the regional stream's queries")
    p.add_argument("--budget-share", type=float, default=0.25, help="the budget section's share of the index")
    p.add_argument("--cold-trials", type=int, default=9)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="faiss threads; 0 = faiss's default (all cores)")
    p.add_argument("--no-lancedb", action="store_true", help="leave LanceDB out")
    p.add_argument("--no-s3", action="store_true", help="leave the moto S3 section out")
    return bench_common.parse_with_quick(p, QUICK, argv)


def ensure_index(bank: str, config: IndexConfig) -> dict:
    """Index the bank unless CURRENT already has an index built with this config; what was done."""
    import ray

    entry = read_manifest(BankRef(bank)).index
    if entry is not None and entry.config == json.loads(json.dumps(config_to_dict(config))):
        return {"reused": True}
    try:
        report = build_index(bank, config)
    finally:
        ray.shutdown()
    return {"reused": False, "build_s": report.timings_s["total"], "stages_s": report.timings_s}


def searcher(bank: str, budget: int | None = None, policy: str = "2q") -> BankSearcher:
    """A fresh BankSearcher (fresh list cache) with `budget` bytes (None: more than the index)."""
    return BankSearcher(open_bank(bank), CacheConfig(memory_bytes=budget or (1 << 40), policy=policy))


def stream_qps(search, queries: np.ndarray, sample=None) -> float:
    """Queries per second of `search` over `queries`, one at a time; `sample` is called after each."""
    start = time.perf_counter()
    for i in range(len(queries)):
        search(queries[i:i + 1])
        if sample is not None:
            sample()
    return len(queries) / (time.perf_counter() - start)


def best_qps(variants: dict, queries: np.ndarray, repeat: int, batch: int = 1) -> dict[str, float]:
    """The best of `repeat` alternating timed passes per variant, in queries per second."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            for i in range(0, len(queries), batch):
                fn(queries[i:i + batch])
            runs[name].append(len(queries) / (time.perf_counter() - start))
    return {name: round(max(v), 1) for name, v in runs.items()}


def recall_section(args, bank, queries, truth, mono, lance) -> dict:
    s = searcher(bank)
    scores, ids = s.search(queries, args.k, args.nprobe, args.refine_factor)
    m_scores, m_ids = mono.search(queries, args.k, args.nprobe, args.refine_factor)
    out = {"refbank": round(recall_at_k(ids, truth), 4), "monolithic": round(recall_at_k(m_ids, truth), 4),
           "ids_equal_monolithic": round(float(np.mean(ids == m_ids)), 5),
           "max_score_diff": float(np.abs(scores - m_scores).max())}
    if lance is not None:
        out["lancedb"] = round(recall_at_k(lance.search_many(queries, args.k), truth), 4)
    return out


def cold_section(args, bank, queries, lance) -> dict:
    """First query after a fresh open, --cold-trials times with different queries; medians."""
    rows = []
    for t in range(args.cold_trials):
        q = queries[t:t + 1]
        io0, start = psutil.Process().io_counters().read_chars, time.perf_counter()
        s = searcher(bank)
        open_s, open_read = time.perf_counter() - start, psutil.Process().io_counters().read_chars - io0
        _, probed = s.ivf.quantizer.search(q, args.nprobe)
        wanted = int(s.cache.directory["bytes"][probed[0]].sum())
        start = time.perf_counter()
        s.search(q, args.k, args.nprobe, args.refine_factor)
        rows.append({"open_ms": ms(open_s), "open_bytes": open_read, "first_query_ms": ms(time.perf_counter() - start),
                     "bytes_fetched": s.stats()["bytes_fetched"], "probed_list_bytes": wanted,
                     "requests": s.stats()["fetch_requests"]})
    out = {"refbank": _medians(rows), "trained_bytes": searcher(bank).entry.trained.bytes,
           "directory_bytes": searcher(bank).entry.directory.bytes,
           "per_candidate": _medians([peers.per_candidate_first_query(bank, queries[t:t + 1], args)
                                      for t in range(args.cold_trials)])}
    out["refbank"]["bytes_over_probed"] = round(out["refbank"]["bytes_fetched"] / out["refbank"]["probed_list_bytes"], 3)
    if lance is not None:
        out["lancedb"] = _medians([lance.cold_first_query(queries[t:t + 1], args) for t in range(args.cold_trials)])
        out["first_query_latency_over_lancedb"] = round(out["refbank"]["first_query_ms"]
                                                         / out["lancedb"]["first_query_ms"], 3)
    return out


def budget_section(args, bank, centers, lance) -> dict:
    rng = np.random.default_rng(31)
    nearest = np.argsort(-(centers @ centers[rng.integers(len(centers))]))  # one region, grown cluster by cluster
    streams = {f"regional_{n}": synthetic.clustered(rng, centers[nearest[:n]], args.stream, args.region_spread)
               for n in args.region_clusters}
    streams["uniform"] = synthetic.clustered(rng, centers, args.stream, args.spread)
    whole = searcher(bank)
    whole.search(streams["uniform"][:100], args.k, whole.nlist)  # every list resident: the whole-index baseline
    budget = int(args.budget_share * whole.cache.whole_bytes)
    out = {"budget_bytes": budget, "index_bytes": whole.cache.whole_bytes}
    for name, queries in streams.items():  # the lists a stream touches, against the budget
        touched = np.unique(whole.ivf.quantizer.search(queries, args.nprobe)[1])
        out[f"{name}_touched_bytes"] = int(whole.cache.charge[touched].sum())
        out[f"{name}_fits_budget"] = out[f"{name}_touched_bytes"] <= budget
    for name, queries in streams.items():
        s = searcher(bank, budget)
        peak = {"bytes": 0}

        def sample(s=s, peak=peak):
            stats = s.stats()
            peak["bytes"] = max(peak["bytes"], stats["resident_bytes"] + stats["leaked_bytes"])

        run = lambda x, s=s: s.search(x, args.k, args.nprobe, args.refine_factor)  # noqa: E731
        first = stream_qps(run, queries, sample)
        steady = stream_qps(run, queries, sample)
        whole_qps = stream_qps(lambda x: whole.search(x, args.k, args.nprobe, args.refine_factor), queries)
        stats = s.stats()
        row = {"first_pass_qps": round(first, 1), "steady_qps": round(steady, 1), "whole_index_qps": round(whole_qps, 1),
               "steady_over_whole": round(steady / whole_qps, 3), "peak_resident_bytes": peak["bytes"],
               "within_budget": peak["bytes"] <= budget, "hit_rate": round(stats["hits"] / max(stats["hits"]
                                                                                            + stats["misses"], 1), 4),
               "evictions": stats["evictions"], "compactions": stats["compactions"]}
        if lance is not None:
            lance_qps = stream_qps(lambda x: lance.search(x[0], args.k), queries)
            row["lancedb_qps"] = round(lance_qps, 1)
            row["steady_over_lancedb"] = round(steady / lance_qps, 1)
        out[name] = row
    return out


def warm_section(args, bank, queries, mono) -> dict:
    s = searcher(bank)
    s.search(queries, args.k, s.nlist)  # every list resident
    out = {}
    for batch in (1, 64):
        qps = best_qps({"refbank": lambda x: s.search(x, args.k, args.nprobe, args.refine_factor),
                        "monolithic": lambda x: mono.search(x, args.k, args.nprobe, args.refine_factor)},
                       queries, args.repeat, batch)
        out[f"batch_{batch}"] = {**qps, "ratio": round(qps["refbank"] / qps["monolithic"], 3)}
    return out


def _medians(rows: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in rows])) for k in rows[0]}


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    bank, centers = synthetic.ensure_bank(args.out, args.vectors, args.dim, args.parts, args.clusters, args.spread)
    config = IndexConfig(factory=args.factory, refine=args.refine_factor > 0,
                         refine_factor=max(args.refine_factor, 1), flat_below=0)
    setup = {"bank": bank, "index": ensure_index(bank, config)}
    x, ids = synthetic.read_all(bank)
    lance = None
    if not args.no_lancedb:
        lance = peers.LancePeer(os.path.join(args.out, f"lance-{args.vectors}x{args.dim}"), bank, x, ids, args)
        setup["lancedb"] = lance.setup
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    queries = synthetic.clustered(np.random.default_rng(123), centers, args.queries, args.spread)
    truth = synthetic.ground_truth(bank, queries, args.k)
    mono = peers.Monolithic(bank, x, ids)
    del x, ids
    out = {"config": vars(args), "cpus": os.cpu_count(), "setup": setup,
           "index": {k: getattr(searcher(bank).entry, k) for k in ("factory", "nlist", "vectors", "code_size")}}
    out["recall"] = recall_section(args, bank, queries, truth, mono, lance)
    out["cold"] = cold_section(args, bank, queries, lance)
    if not args.no_s3:
        out["cold_s3"] = peers.cold_on_s3(bank, queries[:args.cold_trials], args)
    out["budget"] = budget_section(args, bank, centers, lance)
    out["warm"] = warm_section(args, bank, queries, mono)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
