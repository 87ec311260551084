"""`build_index`: sample → train → add (Ray, per part) → slices (Ray, per list range) → text index →
nprobe autotune → report → publish a new bank version whose manifest names the index."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from bank_builder import manifest, storage
from bank_builder.config import config_to_dict
from bank_builder.index import layout
from bank_builder.index.add import add_parts
from bank_builder.index.autotune import autotune
from bank_builder.index.exact import TopK, floors
from bank_builder.index.params import IndexConfig, IndexParams, choose_params
from bank_builder.index.search import SlicedIndex, storage_loader
from bank_builder.index.slices import build_slices
from bank_builder.index.text import write_text_index
from bank_builder.index.train import deserialize, sample_vectors, serialize, train_index
from bank_builder.ray_runtime import init_ray

log = logging.getLogger("refbank.index")
INDEX_FORMAT = 1


@dataclass
class IndexReport:
    """What `build_index` built and published (the full report is the JSON object at `report`)."""

    bank: str
    version: str  # the bank version published with this index
    source_version: str  # the version whose parts were indexed
    index_id: str
    factory: str
    kind: str
    vectors: int
    nlist: int
    code_size: int
    slices: int
    bytes: dict[str, int]  # trained, slices, text, total
    nprobe: int
    k: int
    recall_at_k: float  # at the chosen nprobe, with refine when on
    target_met: bool
    refine_factor: int  # 0 = no refine
    ms_per_query: float
    train_gpu: bool
    timings_s: dict[str, float]
    curve: list[dict]
    report: str  # URL of report.json


class _Stages:
    """Wall-clock seconds per build stage, logged as each ends."""

    def __init__(self) -> None:
        self.start, self.seconds = time.perf_counter(), {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 3)
        log.info("index stage %s: %.2f s", name, self.seconds[name])

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.start, 3)}


def build_index(bank: str, config: IndexConfig = IndexConfig(), storage_options: dict[str, Any] | None = None,
                version: str | None = None) -> IndexReport:
    """Index the visual embeddings of the bank's CURRENT version and publish the next version with it.

    The parts stay as they are; the new version's manifest gains an `index` field (slice table, trained
    index, tuned nprobe, report) and replaces any earlier index. `version`, when given, must name CURRENT: a
    guard against indexing a bank that moved on. Raises BankMismatchError when the bank has no version, when
    `version` is not CURRENT, or when CURRENT moves while indexing (the new index objects are then left
    unreferenced under index/<id>/; re-run)."""
    so = storage_options or {}
    current = manifest.read_current(bank, so)
    if current.version is None:
        raise manifest.BankMismatchError(f"{bank} has no published version; build it first (`refbank build`)")
    if version is not None and version != current.version:
        raise manifest.BankMismatchError(
            f"bank {bank}: {version} is not CURRENT ({current.version}); an index is published as the next "
            "version, so only CURRENT can be indexed. Drop the version argument to index CURRENT.")
    source = manifest.read_manifest(bank, current.version, so)
    parts = sorted(source["parts"], key=lambda p: p["ordinal"])
    n, dim = sum(p["rows"] for p in parts), source["dims"]["visual"]
    params = choose_params(n, dim, config)
    index_id, stage = layout.new_index_id(), _Stages()
    log.info("indexing %d vectors of %s %s as %s (%s), index id %s", n, bank, source["version"], params.factory,
             params.kind, index_id)
    init_ray()
    try:
        entry, report = _build(bank, source, parts, params, config, index_id, stage, so)
        with stage("publish"):
            try:
                published = manifest.publish(bank, {**source, "index": entry, "created_at": entry["created_at"]},
                                             current, so)
            except manifest.ConcurrentUpdateError as exc:
                raise manifest.ConcurrentUpdateError(
                    f"{exc} The new index/{index_id} is left unreferenced: re-run `refbank index`.") from None
    finally:
        layout.remove_tree(storage.join(layout.index_dir(bank, index_id), "staging"), so)
    tune = report["autotune"]
    return IndexReport(
        bank=bank, version=published, source_version=source["version"], index_id=index_id, factory=params.factory,
        kind=params.kind, vectors=n, nlist=params.nlist, code_size=params.code_size, slices=len(entry["slices"]),
        bytes=report["bytes"], nprobe=entry["nprobe"], k=config.k, recall_at_k=tune["recall_at_k"],
        target_met=tune["target_met"], refine_factor=entry["refine_factor"], ms_per_query=tune["ms_per_query"],
        train_gpu=report["train"]["gpu"], timings_s=stage.total(), curve=tune["curve"],
        report=storage.join(layout.index_dir(bank, index_id), layout.REPORT_OBJECT),
    )


def _build(bank: str, source: dict, parts: list[dict], params: IndexParams, config: IndexConfig, index_id: str,
           stage: _Stages, so: dict[str, Any]) -> tuple[dict, dict]:
    """Every stage up to the report; returns (the manifest `index` entry, the report)."""
    text = bool(source["dims"].get("text"))
    with stage("sample"):
        sample = sample_vectors(bank, parts, params, config.seed, so)
    with stage("train"):
        index, gpu = train_index(params, sample.train, config)
        trained = serialize(index)
        trained_entry = layout.write_object(bank, index_id, layout.TRAINED_OBJECT, trained, so)
        # The sample is part of the bank: its k-th best per query is a floor of the bank's, which lets the add
        # tasks skip nearly every score of the exact ground truth.
        exact = TopK(sample.queries, config.k + 1, floors(sample.queries, sample.train, config.k + 1))
        n_train, sample.train = len(sample.train), None  # the largest driver-side array: free it now
    with stage("add"):
        added = add_parts(bank, index_id, parts, trained, params.nlist, exact, config.refine, text, so)
    with stage("slices"):
        table = build_slices(bank, index_id, parts, added.list_sizes, params.code_size, params.dim, config.refine,
                             config.slice_bytes, so)
    with stage("text"):
        text_entry = write_text_index(bank, index_id, added.labels, added.visual_sums, added.counts, so)
    with stage("autotune"):
        sliced = SlicedIndex(deserialize(trained), [tuple(s["lists"]) for s in table],
                             storage_loader(bank, {"id": index_id, "slices": table}, so))
        tune = autotune(sliced, sample.queries, sample.query_ids, added.exact_ids, config)
    sizes = _sizes(trained_entry, table, text_entry)
    entry = {
        "format": INDEX_FORMAT, "id": index_id, "path": f"index/{index_id}", "factory": params.factory,
        "kind": params.kind, "metric": "inner_product", "dims": dict(source["dims"]), "vectors": sum(added.rows.values()),
        "nlist": params.nlist, "code_size": params.code_size, "trained": trained_entry, "slices": table,
        "refine": config.refine, "refine_factor": tune["refine_factor"], "nprobe": tune["nprobe"], "k": config.k,
        "recall_at_k": tune["recall_at_k"], "target_recall": config.target_recall, "target_met": tune["target_met"],
        "text": text_entry, "report": layout.REPORT_OBJECT, "parts": [p["name"] for p in parts],
        "config": config_to_dict(config), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    report = {
        "index_id": index_id, "bank_source_version": source["version"], "factory": params.factory,
        "kind": params.kind, "params": asdict(params), "config": config_to_dict(config), "vectors": entry["vectors"],
        "bytes": sizes, "slices": _slice_stats(table, config.slice_bytes),
        "train": {"vectors": n_train, "gpu": gpu}, "autotune": tune, "timings_s": stage.total(),
    }
    storage.write_json(storage.join(layout.index_dir(bank, index_id), layout.REPORT_OBJECT), report, so)
    return entry, report


def _sizes(trained: dict, table: list[dict], text: dict | None) -> dict[str, Any]:
    slices = sum(s["bytes"] for s in table)
    total = trained["bytes"] + slices + (text["bytes"] if text else 0)
    stored = sum(s["vectors"] for s in table)
    return {"trained": trained["bytes"], "slices": slices, "text": text["bytes"] if text else 0, "total": total,
            "slice_bytes_per_vector": round(slices / max(stored, 1), 2)}


def _slice_stats(table: list[dict], target: int) -> dict[str, Any]:
    sizes = [s["bytes"] for s in table]
    return {"count": len(table), "target_bytes": target, "min_bytes": min(sizes), "max_bytes": max(sizes),
            "mean_bytes": round(sum(sizes) / len(sizes), 1)}
