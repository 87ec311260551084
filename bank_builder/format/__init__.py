"""The bank format: everything refbank keeps on storage, in one layer that imports neither Ray nor torch.

The builder writes through it and the query service reads only through it.

  ref.py           BankRef (URI + fsspec options); object names checked to stay inside the bank
  storage.py       fsspec I/O: atomic writes, conditional writes (create-if-absent, compare-and-swap), ranges
  manifest.py      the typed manifest: Manifest, PartEntry, IndexEntry, ObjectEntry; format versions
  versions.py      CURRENT, published versions, compare-and-swap publish
  lease.py         the bank's lease: one writer at a time where the store has no conditional writes
  parts.py         Parquet parts: schema, segment ids, names, commit markers, rejects, row-group reads
  index_layout.py  index objects: trained quantizer, list directory, list objects, label table
  tombstones.py    removals: tombstone objects of removed segment ids, read back as one sorted array
  retries.py       the retry policy of storage calls and their counters
  errors.py        BankError and its kinds

Layout of a bank (docs/ARCHITECTURE.md has the details):
  CURRENT, versions/<v>/{manifest,published}.json, parts/<part>.{parquet,json}, rejects/<part>.parquet,
  index/<id>/{trained.faissindex, directory.npy, lists/<n>.bin, text.npz, report.json}
"""

from bank_builder.format.errors import (
    BankError,
    BankFormatError,
    BankMismatchError,
    BankNotFoundError,
    BankNotIndexedError,
    ConcurrentUpdateError,
    IndexCorruptError,
    StorageError,
    UnsafeNameError,
)
from bank_builder.format.manifest import (
    FORMAT_VERSION,
    INDEX_FORMAT,
    DeltaEntry,
    IndexEntry,
    Manifest,
    ObjectEntry,
    PartEntry,
    TombstoneEntry,
    make_manifest,
    totals,
)
from bank_builder.format.ref import BankRef, check_name
from bank_builder.format.versions import (
    Current,
    current_version,
    list_pins,
    list_versions,
    no_version_error,
    pin,
    publish,
    published_record,
    read_current,
    read_manifest,
    unpin,
)

__all__ = [
    "FORMAT_VERSION", "INDEX_FORMAT", "BankError", "BankFormatError", "BankMismatchError", "BankNotFoundError",
    "BankNotIndexedError", "BankRef", "ConcurrentUpdateError", "Current", "DeltaEntry", "IndexCorruptError",
    "IndexEntry", "Manifest", "ObjectEntry", "PartEntry", "StorageError", "TombstoneEntry", "UnsafeNameError",
    "check_name", "current_version", "list_pins", "list_versions", "make_manifest", "no_version_error", "pin",
    "publish", "published_record", "read_current", "read_manifest", "totals", "unpin",
]
