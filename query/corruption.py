"""What a damaged bank looks like to the query service: reads of parts that name the part they failed on, and
the name of the object a storage error is about (for the 503 `storage_corrupt` answer, /readyz and /metrics).

A damaged object is one that cannot be read back as written: a list or index object whose checksum differs, a
part whose pages or footer do not decode, an object the manifest lists that is gone, a CURRENT that names no
version. The format layer raises BankFormatError for what it checks; a part read fails inside pyarrow, so
`PartReader` turns that failure into `CorruptObject` naming the part. A store that cannot be reached
(connection, timeout, permission) is not damage and keeps its own error.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from bank_builder.format import BankRef, IndexCorruptError, IndexEntry
from bank_builder.format.parts import ROW_BITS
from query.bank import Bank


class PartReader:
    """The bank's per-segment reads (labels, metadata) with storage failures named: a part that cannot be decoded
    (a torn page, a bad footer) or that is missing raises CorruptObject naming it; a store that cannot be reached
    raises its own OSError unchanged."""

    def __init__(self, bank: Bank) -> None:
        self.bank = bank

    def labels(self, ids: np.ndarray) -> list[str | None]:
        """Bank.labels: the label of each segment id (None: unlabelled, or id -1)."""
        return self._checked(self.bank.labels, ids)

    def metadata(self, ids: np.ndarray) -> list[dict[str, Any]]:
        """Bank.metadata: one metadata dict per segment id."""
        return self._checked(self.bank.metadata, ids)

    def _checked(self, read: Callable[[np.ndarray], Any], ids: np.ndarray) -> Any:
        try:
            return read(ids)
        except (OSError, pa.ArrowInvalid) as exc:
            if not _undecodable(exc):
                raise
            name = self._culprit(read, np.asarray(ids, np.int64).reshape(-1))
            raise CorruptObject(name, f"part {name} of bank {self.bank.uri} cannot be read ({exc}); the object "
                                      "was damaged or removed: restore it, or rebuild the bank") from None

    def _culprit(self, read: Callable[[np.ndarray], Any], ids: np.ndarray) -> str:
        """The part at fault: the first of the parts the ids touch whose own read fails (else the first)."""
        ordinals = np.unique(ids[ids >= 0] >> ROW_BITS).tolist()
        for ordinal in ordinals:
            try:
                read(ids[(ids >> ROW_BITS) == ordinal][:1])
            except (OSError, pa.ArrowInvalid) as exc:
                if _undecodable(exc):
                    return self._name(ordinal)
        return self._name(ordinals[0]) if ordinals else "parts"

    def _name(self, ordinal: int) -> str:
        return f"parts/{self.bank.manifest.part_by_ordinal[ordinal].name}.parquet"


def _undecodable(exc: BaseException) -> bool:
    """Whether a part read failed on the bytes (missing object, Parquet / codec errors: plain OSError without an
    errno, ArrowInvalid) rather than on the way to them (connection, timeout, permission)."""
    if isinstance(exc, (FileNotFoundError, pa.ArrowInvalid)):
        return True
    return type(exc) is OSError and exc.errno is None


class CorruptObject(IndexCorruptError):
    """A bank object that cannot be read back as written; `object` is its name inside the bank."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.object = name


def damaged_object(exc: BaseException, ref: BankRef, index: IndexEntry | None = None) -> str | None:
    """The bank-relative name of the object a storage error is about: its `object` when it carries one, else the
    first URL under the bank its message names, else an object of `index` (or the index itself) it names."""
    named = getattr(exc, "object", None)
    if isinstance(named, str):
        return named
    text = str(exc)
    found = re.search(re.escape(ref.uri.rstrip("/") + "/") + r"([A-Za-z0-9._/-]*[A-Za-z0-9_-])", text)
    if found:
        return found.group(1)
    if index is not None and index.id in text:
        objects = [*index.lists, index.trained, index.directory, *([index.text] if index.text else [])]
        return next((f"index/{index.id}/{o.object}" for o in objects if o.object in text), f"index/{index.id}")
    return None
