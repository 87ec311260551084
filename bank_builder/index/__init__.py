"""The bank's ANN index: IVF(-PQ) trained once, added per part in parallel, stored as list-range slices.

Public API:
  build_index(bank, config=IndexConfig(), storage_options=None, version=None) -> IndexReport
  open_index(bank, version=None, storage_options=None, loader=None, max_resident=None) -> SlicedIndex
  open_text_index(bank, version=None, storage_options=None) -> TextIndex
  choose_params(n, dim, config) -> IndexParams          (what build_index would build, without building)

Modules, one per stage: params (index choice), train (sample + k-means), add (Ray task per part),
slices (regroup lists into slices), search (sliced search + merge + refine), autotune (nprobe),
text (label-text index), layout (object names), source (Parquet row-group reads), build (the driver).
"""

from bank_builder.index.build import IndexReport, build_index
from bank_builder.index.layout import IndexCorruptError
from bank_builder.index.params import IndexConfig, IndexParams, choose_params
from bank_builder.index.search import SliceLoader, SlicedIndex, index_entry, open_index, storage_loader
from bank_builder.index.slices import SliceArrays
from bank_builder.index.text import TextIndex, open_text_index

__all__ = [
    "IndexConfig", "IndexCorruptError", "IndexParams", "IndexReport", "SliceArrays", "SliceLoader", "SlicedIndex",
    "TextIndex", "build_index", "choose_params", "index_entry", "open_index", "open_text_index", "storage_loader",
]
