"""Storage requests per query on S3: a bank on a moto server behind a counting proxy (tests/fault_proxy.py).

    python bench/s3_requests.py                      # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/s3_requests.py   # the same measure of another version

A synthetic bank (index_helpers.make_bank: parts of 4096-row row groups, 64-d vectors) is written to S3 and
indexed; then a BankSearcher serves queries the way the service does: kNN (`search`), then the hits'
metadata (/v1/search) and labels (open-set /v1/segment). The proxy counts every HTTP request that reaches the
store. Printed as JSON: requests per query, by step, for the first queries (cold: footers, row groups, lists
not yet cached) and for later queries on other images (warm), plus request latency percentiles with
--fault-rate > 0 (503s, SlowDown, resets injected by the proxy at that rate, seeded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
HERE = Path(__file__).resolve().parents[1]


def load_fault_proxy():
    """tests/fault_proxy.py of this checkout, loaded by path (another checkout under test may lack it)."""
    spec = importlib.util.spec_from_file_location("fault_proxy", HERE / "tests" / "fault_proxy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_proxy"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--rows", type=int, default=12000, help="rows per part (4096 per row group)")
    p.add_argument("--queries", type=int, default=40, help="queries per phase (cold, warm)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Not bench/ (bench/query.py would shadow the query package); this checkout last, so that PYTHONPATH (the
    # code under test) comes first.
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE / "bench"] + [str(HERE)]

    from bank_builder.index import IndexConfig, build_index
    from query.bank import open_bank
    from query.search import BankSearcher
    from tests.index_helpers import make_bank

    fault_proxy = load_fault_proxy()
    server, endpoint, bucket = fault_proxy.moto_with_bucket()
    proxy = fault_proxy.FaultProxy(endpoint)
    options = {"key": "testing", "secret": "testing", "endpoint_url": proxy.url}
    url = f"s3://{bucket}/bank"
    bank_data = make_bank(url, part_rows=(args.rows,) * args.parts, dim=64, text_dim=16, n_clusters=64,
                          seed=args.seed, storage_options=options)
    build_index(url, IndexConfig(autotune_queries=50), options)

    proxy.reset()
    bank = open_bank(url, storage_options=options)
    searcher = BankSearcher(bank)
    opened = len(proxy.requests)
    rng = np.random.default_rng(args.seed + 1)
    proxy.faults(args.fault_rate, seed=args.seed)
    result = {"code": os.environ.get("PYTHONPATH", str(HERE)), "bank": {"parts": args.parts, "rows": args.rows,
              "row_groups": sum(-(-args.rows // 4096) for _ in range(args.parts))},
              "k": args.k, "fault_rate": args.fault_rate, "open_requests": opened}
    for phase in ("cold", "warm"):
        steps = {"search": [], "metadata": [], "labels": []}
        seconds = []
        for _ in range(args.queries):
            i = int(rng.integers(len(bank_data.vectors)))
            q = bank_data.vectors[i:i + 1].astype(np.float32)
            q = q + 0.05 * rng.standard_normal(q.shape).astype(np.float32)
            q /= np.linalg.norm(q)
            t = time.perf_counter()
            for step, run in (("search", lambda: searcher.search(q, args.k)),
                              ("metadata", lambda: bank.metadata(ids[ids >= 0])),
                              ("labels", lambda: bank.labels(ids))):
                before = len(proxy.requests)
                out = run()
                if step == "search":
                    ids = out[1][0]
                steps[step].append(len(proxy.requests) - before)
            seconds.append(time.perf_counter() - t)
        result[phase] = {step: round(float(np.mean(n)), 2) for step, n in steps.items()}
        result[phase]["total"] = round(float(sum(np.mean(n) for n in steps.values())), 2)
        result[phase]["max_total"] = int(max(map(sum, zip(*steps.values()))))
        result[phase]["query_ms_p50_p99"] = [round(1000 * float(np.percentile(seconds, q)), 1) for q in (50, 99)]
    result["faults_injected"] = dict(proxy.injected)
    result["bank_stats"] = bank.stats()
    result["list_cache_stats"] = {k: v for k, v in searcher.stats().items() if k in ("misses", "fetch_requests")}
    print(json.dumps(result, indent=1))
    proxy.close()
    server.stop()


if __name__ == "__main__":
    main()
