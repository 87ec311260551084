"""Reading a bank's Parquet parts for the index: row group by row group, never a whole bank in memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bank_builder import storage, store

VISUAL = "visual_embedding"


@contextmanager
def open_part(bank: str, name: str, storage_options: dict[str, Any] | None,
              dictionary: list[str] | None = None) -> Iterator[pq.ParquetFile]:
    """A part as a ParquetFile over a seekable fsspec file: row groups are fetched as they are read.

    dictionary: string columns to read dictionary-encoded (integer codes + the row group's distinct values)."""
    fs, path = storage.url_to_fs(store.part_url(bank, name), storage_options)
    with fs.open(path, "rb") as f:
        yield pq.ParquetFile(f, read_dictionary=dictionary)


def read_column(f: pq.ParquetFile, group: int, column: str) -> pa.ChunkedArray:
    """One column of one row group."""
    return f.read_row_group(group, columns=[column])[column]


def matrix(column: pa.ChunkedArray | pa.Array, dtype: type = np.float16) -> np.ndarray:
    """A fixed-size-list column as an (n, width) array (null rows keep their zero slots)."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = values.type.list_size
    child = values.values.slice(values.offset * width, len(values) * width)  # `values` ignores the offset
    return np.asarray(child.to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)


def iter_row_groups(bank: str, name: str, columns: list[str],
                    storage_options: dict[str, Any] | None) -> Iterator[pa.Table]:
    """The part's row groups in order, each as a table of `columns`."""
    with open_part(bank, name, storage_options) as f:
        for i in range(f.num_row_groups):
            yield f.read_row_group(i, columns=columns)


def read_rows(bank: str, name: str, rows: np.ndarray, storage_options: dict[str, Any] | None) -> np.ndarray:
    """Visual embeddings (len(rows), C) float16 of the given sorted row numbers; reads only their row groups."""
    out = []
    with open_part(bank, name, storage_options) as f:
        sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = np.searchsorted(starts, rows, side="right") - 1
        for g in np.unique(groups):
            x = matrix(f.read_row_group(int(g), columns=[VISUAL])[VISUAL])
            out.append(x[rows[groups == g] - starts[g]])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float16)
