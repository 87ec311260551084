"""The text index: every unique label text of the bank with its text embedding, searched exactly.

`text.npz` (np.load(f, allow_pickle=False)): labels <U (L,) sorted; embeddings float16 (L, D), L2-normalised
as the encoder wrote them; prototypes float16 (L, C), each label's mean visual embedding, L2-normalised;
counts int64 (L,), segments per label. Small (one row per distinct label), so search is exact inner product.
"""

from __future__ import annotations

import io
from typing import Any

import faiss
import numpy as np

from bank_builder.index import layout
from bank_builder.index.search import index_entry


class TextIndex:
    """Exact inner-product search over the bank's label texts, with each label's visual prototype and count
    (the label table the vocabulary query mode starts from)."""

    def __init__(self, labels: list[str], embeddings: np.ndarray, prototypes: np.ndarray, counts: np.ndarray) -> None:
        self.labels = list(labels)
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
        self.counts = np.asarray(counts, dtype=np.int64)
        self._flat = faiss.IndexFlatIP(self.embeddings.shape[1])
        self._flat.add(self.embeddings)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def text(self) -> np.ndarray:
        """(L, D) float32 label text embeddings (the name query.segment's LabelTable uses)."""
        return self.embeddings

    def search(self, x: np.ndarray, k: int = 1) -> tuple[np.ndarray, list[list[str]]]:
        """(scores (nq, k) float32 inner products, best first; label texts per query) for text embeddings
        x (nq, D) float32. Fewer than k labels in the bank: rows are shorter."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"text queries must be (n, {self.embeddings.shape[1]}) float32, got {x.shape}")
        scores, rows = self._flat.search(x, min(k, len(self.labels)))
        return scores, [[self.labels[r] for r in row if r >= 0] for row in rows]

    def to_bytes(self) -> bytes:
        """The index as text.npz bytes."""
        buf = io.BytesIO()
        np.savez(buf, labels=np.array(self.labels, dtype=str), embeddings=self.embeddings.astype(np.float16),
                 prototypes=self.prototypes.astype(np.float16), counts=self.counts)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TextIndex:
        """Parse text.npz bytes."""
        z = layout.read_npz(data)
        if "prototypes" not in z:
            raise layout.IndexCorruptError("this text index predates label prototypes (text.npz has no "
                                           "'prototypes'); rebuild the index with `refbank index`")
        return cls([str(s) for s in z["labels"]], z["embeddings"], z["prototypes"], z["counts"])


def write_text_index(bank: str, index_id: str, labels: dict[str, np.ndarray], visual_sums: dict[str, np.ndarray],
                     counts: dict[str, int], storage_options: dict[str, Any] | None) -> dict | None:
    """Write text.npz for `labels` (label → float16 text embedding) with prototypes from `visual_sums`; its
    manifest entry, or None without labels."""
    if not labels:
        return None
    names = sorted(labels)
    sums = np.stack([visual_sums[n] for n in names])
    prototypes = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    text = TextIndex(names, np.stack([labels[n] for n in names]), prototypes, np.array([counts[n] for n in names]))
    entry = layout.write_object(bank, index_id, layout.TEXT_OBJECT, text.to_bytes(), storage_options)
    return {**entry, "labels": len(names)}


def open_text_index(bank: str, version: str | None = None, storage_options: dict[str, Any] | None = None,
                    verify: bool = True) -> TextIndex:
    """The text index of a bank version (default CURRENT); raises when the bank has no label texts."""
    entry = index_entry(bank, version, storage_options)
    if not entry.get("text"):
        raise ValueError(f"bank {bank} has no text index: none of its segments has a label with a text embedding")
    return TextIndex.from_bytes(layout.read_object(bank, entry["id"], entry["text"], storage_options, verify))
