"""`build_index`: sample → train → add (Ray, per part) → list objects (Ray, per list range) + directory →
label table → nprobe autotune → report → publish a new bank version whose manifest names the index.

On a bank whose index already covers some of its parts, only the new parts are added, as a delta
(index/delta.py); an index that covers every part is up to date and nothing is published."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from bank_builder.config import config_to_dict
from bank_builder.format import (
    INDEX_FORMAT, BankMismatchError, BankRef, ConcurrentUpdateError, Current, IndexEntry, Manifest, ObjectEntry,
    index_layout, publish, read_current, read_manifest, storage,
)
from bank_builder.format.index_layout import ListLayout
from bank_builder.format.versions import no_version_error
from bank_builder.index.add import add_parts
from bank_builder.index.autotune import autotune
from bank_builder.index.delta import build_delta
from bank_builder.index.exact import TopK, floors
from bank_builder.index.objects import build_objects
from bank_builder.index.params import IndexConfig, IndexParams, choose_params
from bank_builder.index.scan import ObjectScan
from bank_builder.index.text import write_label_table
from bank_builder.format.trained import deserialize, serialize
from bank_builder.index.train import sample_vectors, train_index
from bank_builder.ray_runtime import init_ray

log = logging.getLogger("refbank.index")


@dataclass
class IndexReport:
    """What `build_index` built and published (the full report is the JSON object at `report`)."""

    bank: str
    version: str | None  # the bank version published with this index (None: up to date, nothing published)
    source_version: str  # the version whose parts were indexed
    index_id: str
    factory: str
    kind: str
    vectors: int
    nlist: int
    code_size: int
    objects: int  # list objects
    bytes: dict[str, int]  # trained, directory, lists, text, total
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
    mode: str = "full"  # "full" (trained and built), "delta" (new parts added), "up_to_date" (nothing to do)
    delta: dict | None = None  # the delta's vectors, parts and drift (mode "delta")
    # this process's storage calls: tries, retries by cause, failed (format.retries); Ray tasks count their own
    storage: dict[str, int] = field(default_factory=dict)


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


# Options that decide an index's codes: an index built with other values cannot take a delta.
STRUCTURAL = ("factory", "memory_target_bytes_per_vector", "opq", "flat_below", "train_sample", "max_nlist",
              "kmeans_iters", "refine", "seed")


def build_index(bank: str | BankRef, config: IndexConfig = IndexConfig(),
                storage_options: dict[str, Any] | None = None, version: str | None = None,
                retrain: bool = False) -> IndexReport:
    """Index the visual embeddings of the bank's CURRENT version and publish the next version with it.

    The parts stay as they are; the new version's manifest gains an `index` entry (list objects, directory,
    trained index, tuned nprobe, report). When CURRENT already has an index built with the same options, only
    the parts it lacks are added, as a delta with the same quantizer; with none lacking, nothing is published
    (mode "up_to_date"). `retrain` trains and builds from scratch. `version`, when given, must name CURRENT: a
    guard against indexing a bank that moved on. Raises BankMismatchError when the bank has no version, when
    `version` is not CURRENT, when the index was built with other options (retrain then), or
    (ConcurrentUpdateError) when CURRENT moves while indexing (the new objects are left unreferenced; re-run)."""
    ref, calls = bank if isinstance(bank, BankRef) else BankRef(bank, storage_options or {}), storage.counters()
    report = _index(ref, config, version, retrain)
    report.storage = (storage.counters() - calls).to_dict()
    return report


def _index(ref: BankRef, config: IndexConfig, version: str | None, retrain: bool) -> IndexReport:
    """build_index without the storage count."""
    current = read_current(ref)
    if current.version is None:
        raise no_version_error(ref)
    if version is not None and version != current.version:
        raise BankMismatchError(
            f"bank {ref}: {version} is not CURRENT ({current.version}); an index is published as the next "
            "version, so only CURRENT can be indexed. Drop the version argument to index CURRENT.")
    source = read_manifest(ref, current.version)
    if source.index is not None and not retrain:
        return _refresh(ref, source, current, config)
    n, dim = sum(p.rows for p in source.parts), source.dims["visual"]
    params = choose_params(n, dim, config)
    index_id, stage = index_layout.new_index_id(), _Stages()
    log.info("indexing %d vectors of %s %s as %s (%s), index id %s", n, ref, source.version, params.factory,
             params.kind, index_id)
    init_ray()
    try:
        entry, report = _build(ref, source, params, config, index_id, stage)
        with stage("publish"):
            published = _publish(ref, source, entry, current, f"index/{index_id}")
    finally:
        index_layout.remove_tree(index_layout.index_url(ref, index_id, "staging"), ref.storage_options)
    tune = report["autotune"]
    return IndexReport(
        bank=ref.uri, version=published, source_version=source.version, index_id=index_id, factory=params.factory,
        kind=params.kind, vectors=n, nlist=params.nlist, code_size=params.code_size, objects=len(entry.lists),
        bytes=report["bytes"], nprobe=entry.nprobe, k=config.k, recall_at_k=tune["recall_at_k"],
        target_met=tune["target_met"], refine_factor=entry.refine_factor, ms_per_query=tune["ms_per_query"],
        train_gpu=report["train"]["gpu"], timings_s=stage.total(), curve=tune["curve"],
        report=index_layout.index_url(ref, index_id, index_layout.REPORT_OBJECT),
    )


def _refresh(ref: BankRef, source: Manifest, current: Current, config: IndexConfig) -> IndexReport:
    """Add the parts CURRENT's index lacks as a delta and publish; nothing when it lacks none."""
    entry = source.index
    recorded = entry.config
    wanted = config_to_dict(config)
    differing = {k: (recorded.get(k), wanted[k]) for k in STRUCTURAL if recorded.get(k) != wanted[k]}
    if differing:
        detail = "; ".join(f"{k}: index has {a!r}, asked for {b!r}" for k, (a, b) in differing.items())
        raise BankMismatchError(f"bank {ref} version {source.version} has an index built with other options "
                                f"({detail}); new parts can only be added with the same ones. Re-run with the "
                                "index's options, or rebuild it with --retrain.")
    covered = set(entry.parts)
    new_parts = sorted((p for p in source.parts if p.name not in covered), key=lambda p: p.ordinal)
    stage = _Stages()
    report = dict(bank=ref.uri, source_version=source.version, index_id=entry.id, factory=entry.factory,
                  kind=entry.kind, nlist=entry.nlist, code_size=entry.code_size, bytes={}, nprobe=entry.nprobe,
                  k=entry.k, recall_at_k=entry.recall_at_k, target_met=entry.target_met,
                  refine_factor=entry.refine_factor, ms_per_query=0.0, train_gpu=False, curve=[],
                  report=index_layout.index_url(ref, entry.id, entry.report))
    if not new_parts:
        log.info("the index of %s %s holds every part: nothing to do", ref, source.version)
        return IndexReport(version=None, vectors=entry.vectors, objects=len(entry.lists), timings_s=stage.total(),
                           mode="up_to_date", **report)
    log.info("adding %d new parts (%d vectors) to index %s as a delta", len(new_parts),
             sum(p.rows for p in new_parts), entry.id)
    init_ray()
    delta_id = index_layout.new_index_id()
    folder = index_layout.delta_folder(delta_id)
    try:
        updated, delta = build_delta(ref, entry, new_parts, config, bool(source.dims.get("text")), stage, delta_id)
        with stage("publish"):
            published = _publish(ref, source, updated, current, f"index/{entry.id}/{folder}")
    finally:
        index_layout.remove_tree(index_layout.index_url(ref, entry.id, folder, "staging"), ref.storage_options)
    return IndexReport(version=published, vectors=updated.vectors, objects=len(updated.lists) + sum(
        len(d.lists) for d in updated.deltas), timings_s=stage.total(), mode="delta", delta=delta, **report)


def _publish(ref: BankRef, source: Manifest, entry: IndexEntry, current: Current, objects: str) -> str:
    """Publish `source` with index `entry` as the next version; ConcurrentUpdateError naming what is left."""
    try:
        return publish(ref, source.with_(index=entry, created_at=entry.created_at), current)
    except ConcurrentUpdateError as exc:
        raise ConcurrentUpdateError(f"{exc} The new {objects} is left unreferenced: re-run `refbank index`.") \
            from None


def _build(ref: BankRef, source: Manifest, params: IndexParams, config: IndexConfig, index_id: str,
           stage: _Stages) -> tuple[IndexEntry, dict]:
    """Every stage up to the report; returns (the manifest's index entry, the report)."""
    parts = sorted(source.parts, key=lambda p: p.ordinal)
    text = bool(source.dims.get("text"))
    layout = ListLayout(params.code_size, params.dim, config.refine)
    with stage("sample"):
        sample = sample_vectors(ref, parts, params, config.seed)
    with stage("train"):
        index, gpu = train_index(params, sample.train, config)
        trained = serialize(index)
        trained_entry = index_layout.write_object(ref, index_id, index_layout.TRAINED_OBJECT, trained)
        # The sample is part of the bank: its k-th best per query is a floor of the bank's, which lets the add
        # tasks skip nearly every score of the exact ground truth.
        exact = TopK(sample.queries, config.k + 1, floors(sample.queries, sample.train, config.k + 1))
        n_train, sample.train = len(sample.train), None  # the largest driver-side array: free it now
    with stage("add"):
        added = add_parts(ref, index_id, parts, trained, params.nlist, exact, config.refine, text)
    with stage("lists"):
        objects, directory = build_objects(ref, index_id, [p.name for p in parts], added.list_sizes, layout,
                                           config.object_bytes)
        directory_entry = index_layout.write_object(ref, index_id, index_layout.DIRECTORY_OBJECT,
                                                    index_layout.directory_bytes(directory))
    with stage("text"):
        text_entry = write_label_table(ref, index_id, added.labels, added.visual_sums, added.counts)
    with stage("autotune"):
        scan = ObjectScan(deserialize(trained), ref, index_id, objects, layout, directory)
        tune = autotune(scan, sample.queries, sample.query_ids, added.exact_ids, config)
    sizes = _sizes(trained_entry, directory_entry, objects, text_entry, sum(added.rows.values()))
    entry = IndexEntry(
        format=INDEX_FORMAT, id=index_id, factory=params.factory, kind=params.kind, metric="inner_product",
        dim=params.dim, vectors=sum(added.rows.values()), nlist=params.nlist, code_size=params.code_size,
        trained=trained_entry, directory=directory_entry, lists=objects, refine=config.refine,
        refine_factor=tune["refine_factor"], nprobe=tune["nprobe"], k=config.k, recall_at_k=tune["recall_at_k"],
        target_recall=config.target_recall, target_met=tune["target_met"], text=text_entry,
        labels=len(added.labels), report=index_layout.REPORT_OBJECT, parts=[p.name for p in parts],
        config=config_to_dict(config), created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        coarse_score_mean=round(added.coarse_score_mean, 6),
    )
    report = {
        "index_id": index_id, "bank_source_version": source.version, "factory": params.factory,
        "kind": params.kind, "params": asdict(params), "config": config_to_dict(config), "vectors": entry.vectors,
        "bytes": sizes, "objects": _object_stats(objects, config.object_bytes), "lists": _list_stats(directory),
        "train": {"vectors": n_train, "gpu": gpu}, "autotune": tune, "timings_s": stage.total(),
    }
    storage.write_json(index_layout.index_url(ref, index_id, index_layout.REPORT_OBJECT), report,
                       ref.storage_options)
    return entry, report


def _sizes(trained: ObjectEntry, directory: ObjectEntry, objects: list[ObjectEntry], text: ObjectEntry | None,
           vectors: int) -> dict[str, Any]:
    lists = sum(o.bytes for o in objects)
    text_bytes = text.bytes if text else 0
    return {"trained": trained.bytes, "directory": directory.bytes, "lists": lists, "text": text_bytes,
            "total": trained.bytes + directory.bytes + lists + text_bytes,
            "list_bytes_per_vector": round(lists / max(vectors, 1), 2)}


def _object_stats(objects: list[ObjectEntry], target: int) -> dict[str, Any]:
    sizes = [o.bytes for o in objects]
    return {"count": len(objects), "target_bytes": target, "min_bytes": min(sizes), "max_bytes": max(sizes),
            "mean_bytes": round(sum(sizes) / len(sizes), 1)}


def _list_stats(directory: Any) -> dict[str, Any]:
    counts = directory["count"]
    return {"count": len(counts), "empty": int((counts == 0).sum()), "max_vectors": int(counts.max()),
            "mean_vectors": round(float(counts.mean()), 2), "max_bytes": int(directory["bytes"].max())}
