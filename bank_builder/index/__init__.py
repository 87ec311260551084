"""The bank's ANN index: IVF(-PQ) trained once, added per part in parallel, stored list by list.

Public API:
  build_index(bank, config=IndexConfig(), storage_options=None, version=None) -> IndexReport
  choose_params(n, dim, config) -> IndexParams          (what build_index would build, without building)

Modules, one per stage: params (index choice), train (sample + k-means), add (Ray task per part), objects
(regroup lists into list objects + the directory), text (label table), scan (object-by-object search for the
autotune), autotune (nprobe), exact (ground truth), build (the driver). The objects' layout is
bank_builder.format.index_layout; the query service reads them through query.lists.
"""

from bank_builder.index.build import IndexReport, build_index
from bank_builder.index.params import IndexConfig, IndexParams, choose_params

__all__ = ["IndexConfig", "IndexParams", "IndexReport", "build_index", "choose_params"]
