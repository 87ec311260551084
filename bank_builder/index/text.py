"""The label table of an index (text.npz): every distinct label with its text embedding, its visual prototype
(the mean of its segments' visual embeddings, L2-normalised) and its segment count, summed by the add pass."""

from __future__ import annotations

import numpy as np

from bank_builder.format import BankRef, ObjectEntry, index_layout
from bank_builder.format.index_layout import LabelTable


def write_label_table(ref: BankRef, index_id: str, labels: dict[str, np.ndarray], visual_sums: dict[str, np.ndarray],
                      counts: dict[str, int]) -> ObjectEntry | None:
    """Write text.npz for `labels` (label → float16 text embedding) with prototypes from `visual_sums`; its
    entry, or None without labels."""
    if not labels:
        return None
    names = sorted(labels)
    sums = np.stack([visual_sums[n] for n in names])
    prototypes = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    table = LabelTable(names, np.stack([labels[n] for n in names]).astype(np.float32), prototypes,
                       np.array([counts[n] for n in names], np.int64))
    return index_layout.write_object(ref, index_id, index_layout.TEXT_OBJECT, table.to_bytes())
