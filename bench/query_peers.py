"""What bench/query.py measures refbank against, and the measurements that need a setup of their own:

  Monolithic       one in-memory faiss index with refbank's trained quantizer and every vector:
                   IndexIDMap(IndexRefine(IVF, SQfp16)) — the same codes and refine vectors refbank stores
  LancePeer        LanceDB on the same vectors: IVF_PQ with the same partitions and sub-vectors, refine, dot product
  per_candidate_first_query   refine vectors fetched per candidate by byte range after the code search, instead
                   of travelling with their list (what refbank does): bytes, requests, latency of a first query
  cold_on_s3       open + first query of refbank on the moto S3 server: requests by S3 operation, bytes
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import faiss
import numpy as np

from bank_builder.format import BankRef, read_manifest, storage
from bank_builder.format.index_layout import ListLayout, index_url, read_directory
from bank_builder.format.trained import read_trained, split_index


class Monolithic:
    """The trained index of the bank's CURRENT version with every vector x (N, C) float32 added under its
    segment id, in part order; refine on float16 copies."""

    def __init__(self, bank: str, x: np.ndarray, ids: np.ndarray) -> None:
        ref = BankRef(bank)
        start = time.perf_counter()
        self.base = read_trained(ref, read_manifest(ref).index)
        store = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        self.refine = faiss.IndexRefine(self.base, store)
        self.index = faiss.IndexIDMap(self.refine)
        self.index.add_with_ids(x, ids)
        self.build_s = time.perf_counter() - start
        self.store = store

    def search(self, q: np.ndarray, k: int, nprobe: int, refine_factor: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, segment ids) at `nprobe`, re-ranking k·refine_factor candidates exactly."""
        params = faiss.IndexRefineSearchParameters()
        params.k_factor, params.base_index_params = float(max(refine_factor, 1)), faiss.SearchParametersIVF(
            nprobe=nprobe)
        return self.index.search(q, k, params=params)


class LancePeer:
    """A LanceDB table of the bank's vectors x (N, C) float32 with their segment ids, and an IVF_PQ index; built
    once per shape and reused."""

    def __init__(self, folder: str, bank: str, x: np.ndarray, ids: np.ndarray, args) -> None:
        import lancedb

        entry = read_manifest(BankRef(bank)).index
        self.params = {"num_partitions": entry.nlist, "num_sub_vectors": entry.code_size, "metric": "dot",
                       "vectors": entry.vectors, "nprobes": args.nprobe, "refine_factor": args.refine_factor}
        self.folder, self.args = folder, args
        marker = os.path.join(folder, "bench.json")
        if os.path.exists(marker) and json.load(open(marker)).get("params") == self.params:
            self.setup = {"reused": True, **json.load(open(marker))}
        else:
            self.setup = self._build(x, ids, marker)
        self.table = lancedb.connect(folder).open_table("bank")

    def _build(self, x: np.ndarray, ids: np.ndarray, marker: str) -> dict:
        import lancedb
        import pyarrow as pa

        if os.path.exists(self.folder):
            import shutil

            shutil.rmtree(self.folder)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        start = time.perf_counter()
        table = lancedb.connect(self.folder).create_table("bank", pa.table({"id": ids, "vector": vectors}))
        loaded = time.perf_counter()
        table.create_index(metric="dot", num_partitions=self.params["num_partitions"],
                           num_sub_vectors=self.params["num_sub_vectors"], index_type="IVF_PQ")
        done = time.perf_counter()
        setup = {"params": self.params, "load_s": round(loaded - start, 2), "index_s": round(done - loaded, 2),
                 "build_s": round(done - start, 2), "lancedb": lancedb.__version__}
        json.dump(setup, open(marker, "w"))
        return {"reused": False, **setup}

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        """(k,) ids of one query (d,) float32."""
        result = (self.table.search(q).distance_type("dot").nprobes(self.args.nprobe)
                  .refine_factor(self.args.refine_factor).limit(k).select(["id", "_distance"]).to_arrow())
        return result["id"].to_numpy()

    def search_many(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(nq, k) ids, -1 where fewer than k came back."""
        out = np.full((len(queries), k), -1, np.int64)
        for i, q in enumerate(queries):
            found = self.search(q, k)
            out[i, :len(found)] = found
        return out

    def cold_first_query(self, q: np.ndarray, args) -> dict:
        """Open + first query in a fresh process (LanceDB caches indexes per process): times and bytes read."""
        code = f"""
import json, time, numpy as np, psutil, lancedb
p = psutil.Process(); q = np.array({q[0].tolist()}, np.float32)
io0, t0 = p.io_counters().read_chars, time.perf_counter()
table = lancedb.connect({self.folder!r}).open_table("bank")
io1, t1 = p.io_counters().read_chars, time.perf_counter()
table.search(q).distance_type("dot").nprobes({args.nprobe}).refine_factor({args.refine_factor}).limit({args.k}).to_arrow()
io2, t2 = p.io_counters().read_chars, time.perf_counter()
print(json.dumps({{"open_ms": 1000 * (t1 - t0), "open_bytes": io1 - io0, "first_query_ms": 1000 * (t2 - t1),
                  "bytes_fetched": io2 - io1}}))
"""
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def per_candidate_first_query(bank: str, q: np.ndarray, args, storage_options: dict | None = None) -> dict:
    """A first query that fetches each probed list's ids and codes only, searches them, then fetches the
    float16 vector of each of its k·refine_factor candidates by its own byte range to re-rank."""
    ref = BankRef(bank, storage_options or {})
    entry = read_manifest(ref).index
    directory, trained = read_directory(ref, entry), read_trained(ref, entry)
    chain, ivf = split_index(trained)
    layout = ListLayout(entry.code_size, entry.dim, entry.refine)
    start = time.perf_counter()
    coarse, lists = ivf.quantizer.search(q, args.nprobe)
    probed = np.unique(lists[lists >= 0])
    head = directory["count"][probed] * (8 + entry.code_size)  # ids + codes: what a search needs first
    spans = _coalesce([(int(directory["object"][l]), int(directory["offset"][l]), int(h)) for l, h in zip(probed, head)])
    blobs = _read_spans(ref, entry, spans)
    invlists, ids = faiss.ArrayInvertedLists(ivf.nlist, entry.code_size), {}
    for l in probed.tolist():
        data = _slice_of(spans, blobs, int(directory["object"][l]), int(directory["offset"][l]),
                         int(directory["count"][l]) * (8 + entry.code_size))
        count = int(directory["count"][l])
        ids[l] = np.frombuffer(data, "<i8", count)
        codes = np.frombuffer(data, np.uint8, count * entry.code_size, 8 * count).copy()
        labels = np.arange(count, dtype=np.int64)  # named: faiss reads through the pointer during the call
        invlists.add_entries(l, count, faiss.swig_ptr(labels), faiss.swig_ptr(codes))
    ivf.replace_invlists(invlists, False)
    kk = args.k * args.refine_factor
    scores, pairs = np.empty((1, kk), np.float32), np.empty((1, kk), np.int64)
    ivf.search_preassigned_c(1, faiss.swig_ptr(q), kk, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                             faiss.swig_ptr(scores), faiss.swig_ptr(pairs), True,
                             faiss.SearchParametersIVF(nprobe=args.nprobe))
    found = pairs[0][pairs[0] >= 0]
    cand_list, cand_row = found >> 32, found & 0xFFFFFFFF
    vec_spans = [(int(directory["object"][l]), int(directory["offset"][l] + directory["count"][l]
                                                   * (8 + entry.code_size) + r * 2 * entry.dim), 2 * entry.dim)
                 for l, r in zip(cand_list, cand_row)]
    vec_blobs = _read_spans(ref, entry, vec_spans)
    vectors = np.stack([np.frombuffer(b, "<f2") for b in vec_blobs]).astype(np.float32)
    exact = vectors @ q[0]
    top = np.argsort(-exact)[:args.k]
    _ = [ids[int(cand_list[i])][int(cand_row[i])] for i in top]
    elapsed = time.perf_counter() - start
    return {"first_query_ms": round(1000 * elapsed, 3), "bytes_fetched": sum(len(b) for b in blobs + vec_blobs),
            "requests": len(spans) + len(vec_spans), "code_requests": len(spans), "vector_requests": len(vec_spans),
            "probed_list_bytes": int(directory["bytes"][probed].sum()), "layout_row_bytes": layout.row_bytes}


def _coalesce(spans: list[tuple[int, int, int]], max_gap: int = 16 << 10) -> list[tuple[int, int, int]]:
    """(object, start, length) spans of one object closer than max_gap merged, as refbank's list fetch does."""
    merged: list[list[int]] = []
    for o, start, length in sorted(spans):
        if merged and merged[-1][0] == o and start - (merged[-1][1] + merged[-1][2]) <= max_gap:
            merged[-1][2] = max(merged[-1][2], start + length - merged[-1][1])
        else:
            merged.append([o, start, length])
    return [tuple(m) for m in merged]


def _read_spans(ref: BankRef, entry, spans) -> list[bytes]:
    urls = [index_url(ref, entry.id, entry.lists[o].object) for o, _, _ in spans]
    return storage.read_ranges(urls, [s for _, s, _ in spans], [s + n for _, s, n in spans], ref.storage_options)


def _slice_of(spans, blobs, o: int, start: int, length: int) -> bytes:
    for (so, ss, sn), blob in zip(spans, blobs):
        if so == o and ss <= start and start + length <= ss + sn:
            return blob[start - ss:start - ss + length]
    raise KeyError((o, start, length))


def cold_on_s3(bank: str, queries: np.ndarray, args) -> dict:
    """Open + first query on the moto S3 server (the index objects and versions uploaded): S3 requests by
    operation and bytes, median over the queries, each on a fresh open; also the per-candidate variant."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs
    from moto.server import ThreadedMotoServer

    from query.bank import open_bank
    from query.lists import CacheConfig
    from query.search import BankSearcher

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    with contextlib.redirect_stdout(sys.stderr):  # moto announces itself on stdout, where the JSON goes
        server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "bench", "secret": "bench", "endpoint_url": f"http://{host}:{port}"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench-bank")
        for root, _, files in os.walk(bank):
            rel_root = os.path.relpath(root, bank)
            if rel_root.split(os.sep)[0] not in ("versions", "index", "."):
                continue  # parts: a kNN search never reads them
            for name in files:
                rel = os.path.normpath(os.path.join(rel_root, name))
                if rel == "CURRENT" or rel.startswith(("versions", "index")):
                    fs.pipe_file(f"bench-bank/{rel}", open(os.path.join(root, name), "rb").read())
        url = "s3://bench-bank"
        calls: list[tuple[str, int]] = []
        original = s3fs.S3FileSystem._call_s3

        async def counting(self, method, *a, **kw):
            out = await original(self, method, *a, **kw)
            calls.append((method, int(out.get("ContentLength", 0)) if isinstance(out, dict) else 0))
            return out

        s3fs.S3FileSystem._call_s3 = counting
        try:
            rows, per_candidate = [], []
            for i in range(len(queries)):
                s3fs.S3FileSystem.clear_instance_cache()
                calls.clear()
                s = BankSearcher(open_bank(url, storage_options=options), CacheConfig(memory_bytes=1 << 40))
                opened = list(calls)
                calls.clear()
                t = time.perf_counter()
                s.search(queries[i:i + 1], args.k, args.nprobe, args.refine_factor)
                rows.append({"open_requests": len(opened), "open_bytes": sum(b for _, b in opened),
                             "first_query_ms": round(1000 * (time.perf_counter() - t), 3),
                             "first_query_gets": sum(m == "get_object" for m, _ in calls),
                             "first_query_bytes": s.stats()["bytes_fetched"]})
                per_candidate.append(per_candidate_first_query(url, queries[i:i + 1], args, options))
        finally:
            s3fs.S3FileSystem._call_s3 = original
        ops: dict[str, int] = {}
        for m, _ in opened:
            ops[m] = ops.get(m, 0) + 1
        med = lambda rs: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}  # noqa: E731
        return {"refbank": med(rows), "open_requests_by_operation": ops, "per_candidate": med(per_candidate)}
    finally:
        server.stop()
