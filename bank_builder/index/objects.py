"""List objects: the inverted lists regrouped from the parts' staging objects into contiguous list ranges of
bounded, balanced byte size, each list stored whole (ids | codes | vectors) so a reader fetches it by range.

Within every list the order is the one a monolithic faiss index gets by adding the parts in ordinal order.
The object layout and the directory are defined by bank_builder.format.index_layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from bank_builder.format import BankRef, ObjectEntry, index_layout, storage
from bank_builder.format.index_layout import ListLayout
from bank_builder.index.add import record_dtype, staging_url


@dataclass
class ObjectBuilt:
    """One written list object: its manifest entry and the directory rows of its lists [lo, hi)."""

    entry: ObjectEntry
    lo: int
    hi: int
    offsets: np.ndarray  # (hi - lo,) byte offset of each list in the object
    counts: np.ndarray  # (hi - lo,) vectors per list
    checksums: np.ndarray  # (hi - lo, 2) uint64


def _greedy(cum: np.ndarray, cap: int) -> list[tuple[int, int]]:
    """Contiguous ranges, each as long as it stays ≤ cap bytes (at least one list each)."""
    nlist, start, ranges = len(cum) - 1, 0, []
    while start < nlist:
        end = max(int(np.searchsorted(cum, cum[start] + cap, side="right")) - 1, start + 1)
        ranges.append((start, min(end, nlist)))
        start = min(end, nlist)
    return ranges


def plan_objects(list_bytes: np.ndarray, target: int) -> list[tuple[int, int]]:
    """List ranges [lo, hi) covering 0..nlist: the fewest objects of ≤ `target` bytes (a list bigger than the
    target gets an object of its own), then balanced — the smallest cap that still needs no more objects."""
    cum = np.concatenate([[0], np.cumsum(list_bytes, dtype=np.int64)])
    biggest = int(list_bytes.max()) if len(list_bytes) else 0
    cap = max(target, biggest, 1)
    count = len(_greedy(cum, cap))
    lo = max(biggest, -(-int(cum[-1]) // count), 1)
    hi = cap
    while lo < hi:  # greedy object count only falls as the cap grows: bisect the smallest sufficient cap
        mid = (lo + hi) // 2
        if len(_greedy(cum, mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    return _greedy(cum, lo)


def build_object(n: int, lo: int, hi: int, staging: list[str], nlist: int, layout: ListLayout, ref: BankRef,
                 index_id: str, folder: str = "") -> ObjectBuilt:
    """Gather lists [lo, hi) from every part's staging object (2 range reads each), write list object n (under
    `folder` of the index folder when given)."""
    dtype = record_dtype(layout.code_size, layout.dim, layout.refine)
    so = ref.storage_options
    heads = storage.read_ranges(staging, [8 * lo] * len(staging), [8 * (hi + 1)] * len(staging), so)
    offsets = np.stack([np.frombuffer(h, "<i8") for h in heads]) if heads else np.zeros((0, hi - lo + 1), np.int64)
    counts = np.diff(offsets, axis=1)  # (parts, lists) entries of each part in each list
    starts = np.concatenate([[0], np.cumsum(counts.sum(axis=0))])
    # Parts in ordinal order within a list (the monolithic add order): part p's run of list lo+j starts after
    # the runs of the parts before it.
    runs = starts[:-1] + np.cumsum(counts, axis=0) - counts
    header = 8 * (nlist + 1)
    owners = [p for p in range(len(staging)) if counts[p].sum()]
    bodies = storage.read_ranges([staging[p] for p in owners],
                                 [header + int(offsets[p, 0]) * dtype.itemsize for p in owners],
                                 [header + int(offsets[p, -1]) * dtype.itemsize for p in owners], so)
    total = int(starts[-1])
    ids, codes = np.empty(total, np.int64), np.empty((total, layout.code_size), np.uint8)
    vectors = np.empty((total, layout.dim), np.float16) if layout.refine else None
    for i, p in enumerate(owners):  # scatter each part's list-sorted records straight to their rows
        rec, bodies[i] = np.frombuffer(bodies[i], dtype), None
        dest = np.arange(len(rec)) + np.repeat(runs[p] - (offsets[p, :-1] - offsets[p, 0]), counts[p])
        ids[dest], codes[dest] = rec["id"], rec["code"]
        if layout.refine:
            vectors[dest] = rec["vector"]
        del rec
    blobs = [layout.encode(ids[a:b], codes[a:b], None if vectors is None else vectors[a:b])
             for a, b in zip(starts[:-1], starts[1:])]
    del ids, codes, vectors  # peak memory ≈ 2 objects + the bytes being written
    sizes = np.array([len(b) for b in blobs], np.int64)
    checksums = np.stack([index_layout.list_checksum(b) for b in blobs]) if blobs else np.zeros((0, 2), np.uint64)
    name = index_layout.list_object(n)
    entry = index_layout.write_object(ref, index_id, f"{folder}/{name}" if folder else name, b"".join(blobs))
    return ObjectBuilt(entry, lo, hi, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
                       np.diff(starts).astype(np.int64), checksums)


def build_objects(ref: BankRef, index_id: str, part_names: list[str], list_sizes: np.ndarray, layout: ListLayout,
                  object_bytes: int, folder: str = "") -> tuple[list[ObjectEntry], np.ndarray]:
    """Plan the list objects from the total list sizes, build them with one Ray task each; returns (their
    entries in object order, the directory: one DIRECTORY_DTYPE row per list). part_names: in ordinal order.
    folder: a delta's folder within the index folder, for its staging and list objects."""
    ranges = plan_objects(list_sizes * layout.row_bytes, object_bytes)
    staging = [staging_url(ref, index_id, name, folder) for name in part_names]
    task = ray.remote(num_cpus=1, max_retries=2)(build_object)
    staging_ref = ray.put(staging)
    built: list[ObjectBuilt] = ray.get([task.remote(n, lo, hi, staging_ref, len(list_sizes), layout, ref, index_id,
                                                    folder) for n, (lo, hi) in enumerate(ranges)])
    directory = np.zeros(len(list_sizes), index_layout.DIRECTORY_DTYPE)
    for n, b in enumerate(built):
        rows = directory[b.lo:b.hi]  # a view: the field assignments below write into `directory`
        rows["object"], rows["offset"], rows["count"], rows["checksum"] = n, b.offsets, b.counts, b.checksums
        rows["bytes"] = b.counts * layout.row_bytes
    return [b.entry for b in built], directory
