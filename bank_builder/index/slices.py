"""Slices: the inverted lists regrouped into contiguous list ranges of bounded, balanced byte size.

A slice object `slices/<n>.npz` (numpy .npz, no pickle: np.load(f, allow_pickle=False)) holds lists [lo, hi):
  lists    int64[2]          lo, hi
  offsets  int64[hi-lo+1]    entries of list lo+j are rows offsets[j] .. offsets[j+1]
  ids      int64[n]          segment ids, by list; within a list in part-ordinal, then row order
  codes    uint8[n, code_size]  the faiss codes (IVF-Flat: the float32 vector bytes)
  vectors  float16[n, C]     only when the index was built with refine: the stored vectors, for re-ranking
Within every list the order is the one a monolithic faiss index gets by adding the parts in ordinal order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from bank_builder.index import layout
from bank_builder.index.add import record_dtype


@dataclass
class SliceArrays:
    """The arrays of one slice (see the module docstring for shapes and order)."""

    lo: int
    hi: int
    offsets: np.ndarray
    ids: np.ndarray
    codes: np.ndarray
    vectors: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to_bytes(self) -> bytes:
        """The slice as an uncompressed .npz (codes barely compress; reads stay zero-parse)."""
        arrays = {"lists": np.array([self.lo, self.hi], np.int64), "offsets": self.offsets.astype(np.int64),
                  "ids": np.ascontiguousarray(self.ids, np.int64), "codes": np.ascontiguousarray(self.codes)}
        if self.vectors is not None:
            arrays["vectors"] = np.ascontiguousarray(self.vectors, np.float16)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SliceArrays:
        """Parse a slice object written by `to_bytes`."""
        z = layout.read_npz(data)
        lo, hi = (int(v) for v in z["lists"])
        return cls(lo, hi, z["offsets"], z["ids"], z["codes"], z.get("vectors"))


def _greedy(cum: np.ndarray, cap: int) -> list[tuple[int, int]]:
    """Contiguous ranges, each as long as it stays ≤ cap bytes (at least one list each)."""
    nlist, start, ranges = len(cum) - 1, 0, []
    while start < nlist:
        end = max(int(np.searchsorted(cum, cum[start] + cap, side="right")) - 1, start + 1)
        ranges.append((start, min(end, nlist)))
        start = min(end, nlist)
    return ranges


def plan_slices(list_bytes: np.ndarray, target: int) -> list[tuple[int, int]]:
    """List ranges [lo, hi) covering 0..nlist: the fewest slices of ≤ `target` bytes (a list bigger than the
    target gets a slice of its own), then balanced — the smallest cap that still needs no more slices."""
    cum = np.concatenate([[0], np.cumsum(list_bytes, dtype=np.int64)])
    biggest = int(list_bytes.max()) if len(list_bytes) else 0
    cap = max(target, biggest, 1)
    count = len(_greedy(cum, cap))
    lo = max(biggest, -(-int(cum[-1]) // count), 1)
    hi = cap
    while lo < hi:  # greedy slice count only falls as the cap grows: bisect the smallest sufficient cap
        mid = (lo + hi) // 2
        if len(_greedy(cum, mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    return _greedy(cum, lo)


def build_slice(n: int, lo: int, hi: int, staging: list[str], nlist: int, code_size: int, dim: int, refine: bool,
                bank: str, index_id: str, storage_options: dict[str, Any] | None) -> dict:
    """Gather lists [lo, hi) from every part's staging object (2 range reads each), write slice n; its entry."""
    dtype = record_dtype(code_size, dim, refine)
    heads = layout.read_ranges([(url, 8 * lo, 8 * (hi + 1)) for url in staging], storage_options)
    offsets = np.stack([np.frombuffer(h, "<i8") for h in heads]) if heads else np.zeros((0, hi - lo + 1), np.int64)
    counts = np.diff(offsets, axis=1)  # (parts, lists) entries of each part in each list
    starts = np.concatenate([[0], np.cumsum(counts.sum(axis=0))])
    # Parts in ordinal order within a list (the monolithic add order): part p's run of list lo+j starts after
    # the runs of the parts before it.
    runs = starts[:-1] + np.cumsum(counts, axis=0) - counts
    header = 8 * (nlist + 1)
    owners = [p for p in range(len(staging)) if counts[p].sum()]
    bodies = layout.read_ranges([(staging[p], header + int(offsets[p, 0]) * dtype.itemsize,
                                  header + int(offsets[p, -1]) * dtype.itemsize) for p in owners], storage_options)
    total = int(starts[-1])
    ids, codes = np.empty(total, np.int64), np.empty((total, code_size), np.uint8)
    vectors = np.empty((total, dim), np.float16) if refine else None
    for i, p in enumerate(owners):  # scatter each part's list-sorted records straight to their slice rows
        rec, bodies[i] = np.frombuffer(bodies[i], dtype), None
        dest = np.arange(len(rec)) + np.repeat(runs[p] - (offsets[p, :-1] - offsets[p, 0]), counts[p])
        ids[dest], codes[dest] = rec["id"], rec["code"]
        if refine:
            vectors[dest] = rec["vector"]
        del rec
    data = SliceArrays(lo, hi, starts, ids, codes, vectors).to_bytes()
    del ids, codes, vectors  # peak memory ≈ 2 slices + the npz being written
    entry = layout.write_object(bank, index_id, layout.slice_object(n), data, storage_options)
    return {"lists": [lo, hi], **entry, "vectors": total}


def build_slices(bank: str, index_id: str, parts: list[dict], list_sizes: np.ndarray, code_size: int, dim: int,
                 refine: bool, slice_bytes: int, storage_options: dict[str, Any] | None) -> list[dict]:
    """Plan the slices from the total list sizes and build them with one Ray task each; the slice table."""
    itemsize = record_dtype(code_size, dim, refine).itemsize
    ranges = plan_slices(list_sizes * itemsize, slice_bytes)
    staging = [layout.staging_url(bank, index_id, p["name"]) for p in sorted(parts, key=lambda p: p["ordinal"])]
    task = ray.remote(num_cpus=1, max_retries=2)(build_slice)
    staging_ref = ray.put(staging)
    refs = [task.remote(n, lo, hi, staging_ref, len(list_sizes), code_size, dim, refine, bank, index_id,
                        storage_options) for n, (lo, hi) in enumerate(ranges)]
    return ray.get(refs)
