"""A bank's life after its first build: removals (tombstones), garbage collection, and what a bank holds.

  remove.py  remove_segments: a version whose tombstones hide segments from searches and lookups
  gc.py      collect_garbage: delete objects no retained version uses (last N, CURRENT, pinned)
  info.py    bank_info: versions, parts, counts, index layout, deltas, tombstones, sizes, encoder
Incremental index refresh and compaction live with the index (bank_builder.index.delta, .compact).
"""

from bank_builder.lifecycle.gc import GcReport, collect_garbage
from bank_builder.lifecycle.info import bank_info
from bank_builder.lifecycle.remove import Removal, RemovalReport, remove_segments

__all__ = ["GcReport", "Removal", "RemovalReport", "bank_info", "collect_garbage", "remove_segments"]
