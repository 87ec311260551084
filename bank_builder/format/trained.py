"""The trained index object (`trained.faissindex`): plain faiss bytes, and its parts as refbank uses them.

Every refbank index is an IVF, optionally behind vector transforms (OPQ): `split_index` gives the two apart.
Imports faiss (not Ray, not torch); the rest of the format layer does not need it.
"""

from __future__ import annotations

import faiss
import numpy as np

from bank_builder.format.errors import IndexCorruptError
from bank_builder.format.index_layout import read_object
from bank_builder.format.manifest import IndexEntry
from bank_builder.format.ref import BankRef


def serialize(index: faiss.Index) -> bytes:
    """The index in plain faiss format (what faiss.write_index writes): readable by faiss.read_index."""
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    """The index serialised by `serialize`."""
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def split_index(index: faiss.Index) -> tuple[list[faiss.VectorTransform], faiss.IndexIVF]:
    """(vector transforms applied before the IVF, the IVF itself) of a refbank index."""
    if isinstance(index, faiss.IndexPreTransform):
        chain = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        return chain, faiss.downcast_index(index.index)
    return [], index


def apply_chain(chain: list[faiss.VectorTransform], x: np.ndarray) -> np.ndarray:
    """`x` (n, d) float32 through the transforms, in order (the identity when there are none)."""
    for vt in chain:
        x = vt.apply(x)
    return x


def read_trained(ref: BankRef, entry: IndexEntry) -> faiss.Index:
    """The trained, empty index of `entry`, checked against its sha256 and the entry's shape."""
    try:
        index = deserialize(read_object(ref, entry.id, entry.trained))
    except RuntimeError as exc:  # faiss's reader refuses bytes that are not an index
        raise IndexCorruptError(f"the trained index of {entry.id} cannot be read ({exc})") from None
    chain, ivf = split_index(index)
    if not isinstance(ivf, faiss.IndexIVF) or ivf.nlist != entry.nlist or ivf.code_size != entry.code_size \
            or index.d != entry.dim:
        raise IndexCorruptError(f"the trained index of {entry.id} does not match its manifest entry "
                                f"(nlist {entry.nlist}, code size {entry.code_size}, dim {entry.dim})")
    return index
