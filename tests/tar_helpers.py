"""Build small WebDataset tars in tests: encoded images, masks, json members, and whole shards."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Members = list[tuple[str, bytes]]


def rgb(seed: int, height: int = 8, width: int = 10) -> np.ndarray:
    """A seeded random (H, W, 3) uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(array: np.ndarray | Image.Image, fmt: str = "PNG", mode: str | None = None) -> bytes:
    """Image bytes in `fmt` of an array (or PIL image), optionally converted to `mode` first."""
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def tar_bytes(members: Members, *, gz: bool = False, end_marker: bool = True) -> bytes:
    """A tar (or .tar.gz) of the members in order; end_marker=False leaves off the closing zero blocks."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        end = tar.offset
    data = out.getvalue() if end_marker else out.getvalue()[:end]
    return gzip.compress(data, mtime=0) if gz else data


def data_offset(data: bytes, name: str) -> int:
    """Byte offset of member `name`'s data inside an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmember(name).offset_data


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)
