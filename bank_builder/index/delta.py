"""Incremental refresh: the parts a version added since its index was built go into a delta — list objects and a
directory of their own under `index/<id>/deltas/<delta id>/`, encoded with the index's trained quantizer — so a
refresh costs time in proportion to the new vectors, not the bank. The label table is updated from its sums.

Drift: the quantizer was trained on the older vectors. The add pass measures each delta's mean coarse score (inner
product with the nearest centroid); when the delta's mean coarse distance (1 − score) grows past
DRIFT_RETRAIN times the base's, the report recommends `refbank index --retrain`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bank_builder.format import BankRef, DeltaEntry, IndexEntry, PartEntry, index_layout
from bank_builder.format.index_layout import LabelTable, ListLayout, delta_folder, read_label_table
from bank_builder.index.add import add_parts
from bank_builder.index.exact import TopK
from bank_builder.index.objects import build_objects
from bank_builder.index.params import IndexConfig
from bank_builder.index.text import write_label_table, write_table

DRIFT_RETRAIN = 1.25  # delta's mean coarse distance ÷ the base's above which a retrain is recommended


def build_delta(ref: BankRef, entry: IndexEntry, new_parts: list[PartEntry], config: IndexConfig, text: bool,
                stage: Any, delta_id: str, curation: dict[str, str] | None = None) -> tuple[IndexEntry, dict]:
    """Add `new_parts` to the index `entry` as delta `delta_id` (fresh, never reused); returns (the index entry
    naming it, the delta report). stage: the build's stage timer (a context manager per stage name). curation:
    part name → curation object of the curated new parts (their kept rows only are added)."""
    folder = delta_folder(delta_id)
    layout = ListLayout(entry.code_size, entry.dim, entry.refine)
    trained = index_layout.read_object(ref, entry.id, entry.trained)
    names = [p.name for p in sorted(new_parts, key=lambda p: p.ordinal)]
    no_queries = TopK(np.zeros((0, entry.dim), np.float32), config.k + 1)  # the tuned nprobe stays: no ground truth
    with stage("add"):
        added = add_parts(ref, entry.id, new_parts, trained, entry.nlist, no_queries, entry.refine, text, folder,
                          curation)
    with stage("lists"):
        objects, directory = build_objects(ref, entry.id, names, added.list_sizes, layout, config.object_bytes,
                                           folder)
        directory_entry = index_layout.write_object(ref, entry.id, f"{folder}/{index_layout.DIRECTORY_OBJECT}",
                                                    index_layout.directory_bytes(directory))
    with stage("text"):
        text_entry, labels = _updated_labels(ref, entry, added, folder)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    delta = DeltaEntry(id=delta_id, directory=directory_entry, lists=objects, vectors=added.vectors, parts=names,
                       coarse_score_mean=round(added.coarse_score_mean, 6), created_at=created)
    updated = entry.with_(deltas=[*entry.deltas, delta], vectors=entry.vectors + added.vectors,
                          parts=[*entry.parts, *names], text=text_entry, labels=labels, created_at=created,
                          curation={**entry.curation, **(curation or {})})
    return updated, drift_report(entry, delta)


def drift_report(entry: IndexEntry, delta: DeltaEntry) -> dict:
    """How far a delta's vectors lie from the quantizer trained on the base's, and whether to retrain."""
    base = 1.0 - entry.coarse_score_mean
    ratio = (1.0 - delta.coarse_score_mean) / base if base > 0 else 1.0
    return {"id": delta.id, "vectors": delta.vectors, "parts": delta.parts, "objects": len(delta.lists),
            "coarse_score_mean": delta.coarse_score_mean, "base_coarse_score_mean": entry.coarse_score_mean,
            "drift_ratio": round(ratio, 4), "retrain_recommended": ratio > DRIFT_RETRAIN,
            "deltas": len(entry.deltas) + 1}


def _updated_labels(ref: BankRef, entry: IndexEntry, added: Any, folder: str) -> tuple[Any, int]:
    """(the label table entry after adding the delta's labels, how many labels it has)."""
    table = read_label_table(ref, entry)
    if table is None:
        text = write_label_table(ref, entry.id, added.labels, added.visual_sums, added.counts,
                                 f"{folder}/{index_layout.TEXT_OBJECT}")
        return text, len(added.labels)
    if not added.counts:
        return entry.text, entry.labels
    merged: LabelTable = table.merged(added.labels, added.visual_sums, added.counts)
    return write_table(ref, entry.id, merged, f"{folder}/{index_layout.TEXT_OBJECT}"), len(merged.labels)
