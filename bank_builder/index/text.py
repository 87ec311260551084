"""The label table of an index (text.npz): every distinct label with its text embedding, its visual prototype
(the mean of its segments' visual embeddings, L2-normalised) and its segment count, summed by the add pass."""

from __future__ import annotations

import numpy as np

from bank_builder.format import BankRef, ObjectEntry, index_layout
from bank_builder.format.index_layout import LabelTable


def write_label_table(ref: BankRef, index_id: str, labels: dict[str, np.ndarray], visual_sums: dict[str, np.ndarray],
                      counts: dict[str, int], name: str = index_layout.TEXT_OBJECT) -> ObjectEntry | None:
    """Write `name` (text.npz) for `labels` (label → float16 text embedding) with their visual sums and counts;
    its entry, or None without labels."""
    if not labels:
        return None
    names = sorted(labels)
    table = LabelTable(names, np.stack([labels[n] for n in names]).astype(np.float32),
                       np.stack([visual_sums[n] for n in names]).astype(np.float64),
                       np.array([counts[n] for n in names], np.int64))
    return write_table(ref, index_id, table, name)


def write_table(ref: BankRef, index_id: str, table: LabelTable, name: str) -> ObjectEntry | None:
    """Write a label table as `name` under the index folder; None for an empty table (no object)."""
    if not table.labels:
        return None
    return index_layout.write_object(ref, index_id, name, table.to_bytes())
