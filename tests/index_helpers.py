"""Helpers of the index tests: seeded synthetic banks written as parts, brute-force ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from bank_builder.format import BankRef, PartEntry, make_manifest, parts, publish, read_current, read_manifest
from bank_builder.format.trained import apply_chain, split_index


@dataclass
class SyntheticBank:
    """What a synthetic bank holds, in manifest (part ordinal, row) order."""

    url: str
    vectors: np.ndarray  # (N, C) float16, L2-normalised
    ids: np.ndarray  # (N,) int64 segment ids
    centers: np.ndarray  # (n_clusters, C) float32, the clusters the vectors were drawn around
    label_names: list[str]
    label_text: np.ndarray  # (n_labels, D) float16 text embedding of each label


def clustered(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float = 0.35) -> np.ndarray:
    """n unit vectors (float32) scattered around random centers."""
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, centers.shape[1])) / np.sqrt(
        centers.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _rows(name: str, labels: list[str | None]) -> parts.SegmentRows:
    rows = parts.SegmentRows()
    for i, label in enumerate(labels):
        rows.image_key.append(f"{name}/{i // 4}")
        rows.segment_index.append(i % 4)
        rows.label.append(label)
        rows.label_source.append("none" if label is None else "ground_truth")
        rows.bbox.append((0, 0, 4, 4))
        rows.area.append(16)
        rows.rle.append({"size": [4, 4], "counts": "0"})
        rows.mask_kind.append("superpixel" if label is None else "instance")
    return rows


def make_bank(url: str, part_rows: tuple[int, ...] = (1500, 5000, 800, 1700), dim: int = 48, text_dim: int = 16,
              n_clusters: int = 40, n_labels: int = 12, seed: int = 0,
              storage_options: dict[str, Any] | None = None) -> SyntheticBank:
    """Write one Parquet part per entry of part_rows (a 5000-row part spans two row groups), publish v000001."""
    rng, ref = np.random.default_rng(seed), BankRef(url, storage_options or {})
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    names = [f"label-{i:02d}" for i in range(n_labels)]
    label_text = rng.standard_normal((n_labels, text_dim))
    label_text = (label_text / np.linalg.norm(label_text, axis=1, keepdims=True)).astype(np.float16)
    infos, vectors, ids = [], [], []
    for ordinal, n in enumerate(part_rows):
        name = f"part-{ordinal:03d}"
        x = clustered(rng, centers, n).astype(np.float16)
        which = rng.integers(-1, n_labels, n)  # -1: an unlabeled segment (no label, no text embedding)
        labels = [names[w] if w >= 0 else None for w in which]
        text = [label_text[w] if w >= 0 else None for w in which]
        table = parts.part_table(name, ordinal, _rows(name, labels), x, np.ones(n, np.float32), text, text_dim)
        info = PartEntry(name, ordinal, f"synthetic://{name}", n, 0, "", n // 4, 0, {}, "fp")
        infos.append(parts.write_part(ref, table, info, {"name": "synthetic"}))
        vectors.append(x)
        ids.append([parts.segment_id(ordinal, r) for r in range(n)])
    spec = {"name": "synthetic", "visual_dim": dim, "text_dim": text_dim}
    publish(ref, make_manifest(infos, spec, "fp", {}), read_current(ref))
    return SyntheticBank(url, np.concatenate(vectors), np.concatenate(ids).astype(np.int64), centers, names,
                         label_text)


def extend_bank(bank: SyntheticBank, part_rows: tuple[int, ...], seed: int = 9,
                storage_options: dict[str, Any] | None = None) -> SyntheticBank:
    """Write more parts (the next ordinals, vectors around the same centers) and publish them with the bank's
    parts as the next version (its index, tombstones and curation carried over); the bank with every vector."""
    ref = BankRef(bank.url, storage_options or {})
    m = read_manifest(ref)
    rng = np.random.default_rng(seed)
    infos, vectors, ids = list(m.parts), [bank.vectors], [bank.ids]
    for ordinal in range(len(m.parts), len(m.parts) + len(part_rows)):
        n = part_rows[ordinal - len(m.parts)]
        name = f"part-{ordinal:03d}"
        x = clustered(rng, bank.centers, n).astype(np.float16)
        which = rng.integers(-1, len(bank.label_names), n)
        labels = [bank.label_names[w] if w >= 0 else None for w in which]
        text = [bank.label_text[w] if w >= 0 else None for w in which]
        table = parts.part_table(name, ordinal, _rows(name, labels), x, np.ones(n, np.float32), text,
                                 bank.label_text.shape[1])
        info = PartEntry(name, ordinal, f"synthetic://{name}", n, 0, "", n // 4, 0, {}, "fp")
        infos.append(parts.write_part(ref, table, info, {"name": "synthetic"}))
        vectors.append(x)
        ids.append(np.array([parts.segment_id(ordinal, r) for r in range(n)], np.int64))
    publish(ref, make_manifest(infos, m.encoder, m.fingerprint, m.build).with_(
        index=m.index, tombstones=m.tombstones, curation=m.curation), read_current(ref))  # as a build carries them
    return SyntheticBank(bank.url, np.concatenate(vectors), np.concatenate(ids), bank.centers, bank.label_names,
                         bank.label_text)


def exact_knn(bank: SyntheticBank, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner product over the bank's stored (float16) vectors: (scores, segment ids)."""
    scores = queries.astype(np.float32) @ bank.vectors.astype(np.float32).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), bank.ids[top]


class Monolithic:
    """One faiss index holding every bank vector: the trained index + (refine) an IndexRefine over float16
    copies. Vectors carry the row numbers the list cache gives them (list by list, part order within a list),
    so ties in code scores break the same way; results are mapped back to segment ids."""

    def __init__(self, trained: faiss.Index, bank: SyntheticBank, refine: bool = True) -> None:
        x = bank.vectors.astype(np.float32)
        chain, ivf = split_index(trained)
        _, lists = ivf.quantizer.search(np.ascontiguousarray(apply_chain(chain, x), dtype=np.float32), 1)
        order = np.argsort(lists[:, 0], kind="stable")  # row r holds vector order[r]
        rows = np.empty(len(x), np.int64)
        rows[order] = np.arange(len(x))
        trained.add_with_ids(x, rows)
        self.base, self.row_ids = trained, bank.ids[order]
        self.index = self.base
        if refine:
            store = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            store.add(x[order])
            self.index = faiss.IndexRefine(self.base, store)
            self.store = store

    def search(self, q: np.ndarray, k: int, nprobe: int, refine_factor: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(scores, segment ids) at nprobe; refine_factor > 0 re-ranks k·refine_factor candidates exactly."""
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if refine_factor:
            outer = faiss.IndexRefineSearchParameters()
            outer.k_factor, outer.base_index_params = float(refine_factor), params
            scores, rows = self.index.search(q, k, params=outer)
        else:
            scores, rows = self.base.search(q, k, params=params)
        return scores, np.where(rows >= 0, self.row_ids[np.maximum(rows, 0)], -1)


def assert_same_topk(d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray) -> None:
    """Same scores bit for bit; same ids, compared as sets among equal scores. The last score group of a row is
    skipped: when it ties with an unreturned candidate, either search may keep any of the tied ids."""
    np.testing.assert_array_equal(d1, d2)
    for row in range(len(d1)):
        values = np.unique(d1[row])
        for v in values[1:] if len(values) > 1 else []:  # unique is ascending: values[0] is the last group
            assert set(i1[row][d1[row] == v]) == set(i2[row][d2[row] == v]), (row, v)
    assert np.mean(i1 == i2) > 0.95
