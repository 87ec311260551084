"""Writing corpus shards in the project's convention (docs/CORPUS.md): member encoders (PNG, canonical
JSON) and deterministic uncompressed tars, shared by the synthetic generator and the dataset converter."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG of an (H, W) uint8 / uint16 or (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def json_bytes(value: Any) -> bytes:
    """Canonical UTF-8 JSON (sorted keys, compact) so equal content gives equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of `members` with fixed metadata (mtime 0, uid/gid 0, mode 0644)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()
