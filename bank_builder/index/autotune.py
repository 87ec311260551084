"""nprobe autotune: recall@k against exact search for a range of nprobe; the smallest reaching the target wins.

One streaming pass over the list objects measures every nprobe at once (memory: one object plus the candidates).

Queries are bank vectors held out of the training sample. Each query's own segment id is left out of both
the exact and the approximate results (leave-one-out), so a query finding itself does not inflate recall.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from bank_builder.index.params import IndexConfig
from bank_builder.index.scan import Candidates, ObjectScan

log = logging.getLogger("refbank.index")


def drop_self(ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """(nq, k) ids without each query's own id; rows that lack it drop their last column instead."""
    keep = ids != query_ids[:, None]
    keep[keep.all(axis=1), -1] = False
    return ids[keep].reshape(len(ids), -1)[:, :k]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids; -1 = no result, never counted)."""
    valid = truth >= 0
    hits = ((found[:, :, None] == truth[:, None, :]) & valid[:, None, :]).any(axis=1)
    return float(np.mean(hits.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)))


def sweep(index: ObjectScan, queries: np.ndarray, nprobes: list[int], k: int,
          refine_factor: int) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, dict[int, float]], float]:
    """Top-k ids and search seconds for every nprobe, plain and (refine_factor > 0) refined, in one pass over
    the list objects: each is loaded once and dropped, so memory stays at one object whatever the bank size.

    Seconds per nprobe = coarse assignment + the per-object searches + merges; object load time is returned
    apart. Returns (ids, seconds, load seconds)."""
    modes = {"plain": (k, False)} | ({"refine": (k * refine_factor, True)} if refine_factor > 0 else {})
    seconds = {mode: {} for mode in modes}
    for nprobe in nprobes:
        start = time.perf_counter()
        index.probe(queries, nprobe)
        for mode in modes:
            seconds[mode][nprobe] = time.perf_counter() - start
    xt, coarse, lists = index.probe(queries, max(nprobes))  # probes of a smaller nprobe are a prefix of these
    owner = index.objects_for(lists)
    merged = {(mode, p): Candidates.empty(len(queries), m, refine) for mode, (m, refine) in modes.items()
              for p in nprobes}
    load_s = 0.0
    for n in np.unique(owner[owner >= 0]):
        start = time.perf_counter()
        res = index.load(int(n))
        load_s += time.perf_counter() - start
        for nprobe in nprobes:
            if not (owner[:, :nprobe] == n).any():
                continue
            for mode, (m, refine) in modes.items():
                start = time.perf_counter()
                found = index.candidates(res, int(n), queries, xt, lists[:, :nprobe], coarse[:, :nprobe],
                                               owner[:, :nprobe], m, refine)
                merged[mode, nprobe] = merged[mode, nprobe].merge(found, m)
                seconds[mode][nprobe] += time.perf_counter() - start
        del res
    ids = {mode: {p: merged[mode, p].result(k)[1] for p in nprobes} for mode in modes}
    return ids, seconds, load_s


def curve(ids: dict[int, np.ndarray], seconds: dict[int, float], query_ids: np.ndarray, truth: np.ndarray) -> list[dict]:
    """[{nprobe, recall_at_k, ms_per_query}] from a sweep's results of one mode."""
    k, nq = truth.shape[1], len(truth)
    return [{"nprobe": p, "recall_at_k": round(recall_at_k(drop_self(ids[p], query_ids, k), truth), 5),
             "ms_per_query": round(1000 * seconds[p] / max(nq, 1), 4)} for p in sorted(ids)]


def choose(curve: list[dict], target: float) -> tuple[dict, bool]:
    """(the smallest-nprobe point reaching `target`, True), else (the best point, False)."""
    for point in curve:
        if point["recall_at_k"] >= target:
            return point, True
    best = max(curve, key=lambda p: (p["recall_at_k"], -p["nprobe"]))
    return best, False


def autotune(index: ObjectScan, queries: np.ndarray, query_ids: np.ndarray, exact_ids: np.ndarray,
             config: IndexConfig) -> dict:
    """Recall / latency curves (with and without refine) and the chosen nprobe, as a report section.

    exact_ids: (nq, k + 1) exact top ids of the queries over the whole bank (self included)."""
    truth = drop_self(exact_ids, query_ids, config.k)
    nprobes = sorted({min(p, index.nlist) for p in config.nprobe_candidates})
    refine = config.refine_factor if config.refine else 0
    ids, seconds, load_s = sweep(index, np.ascontiguousarray(queries, np.float32), nprobes, config.k + 1, refine)
    tuned = curve(ids["refine" if refine else "plain"], seconds["refine" if refine else "plain"], query_ids, truth)
    chosen, met = choose(tuned, config.target_recall)
    if not met:
        log.warning("no nprobe in %s reaches recall@%d %.3f (best %.3f at nprobe %d); add larger candidates, "
                    "turn refine on or raise the memory target", nprobes, config.k, config.target_recall,
                    chosen["recall_at_k"], chosen["nprobe"])
    return {
        "queries": len(queries), "k": config.k, "target_recall": config.target_recall,
        "refine_factor": refine, "nprobe": chosen["nprobe"], "recall_at_k": chosen["recall_at_k"],
        "ms_per_query": chosen["ms_per_query"], "target_met": met, "curve": tuned,
        "curve_no_refine": curve(ids["plain"], seconds["plain"], query_ids, truth) if refine else None,
        "object_load_s": round(load_s, 4),
    }
