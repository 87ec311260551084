"""Encoder inputs from a decoded sample: the image squashed to the encoder's S×S input (no crop) and each mask as
the exact fraction of every g×g feature cell it covers. numpy and PIL only, so decode tasks never import torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


class InputShape(Protocol):
    """What input preparation needs to know of an encoder (an EncoderSpec is one)."""

    @property
    def image_size(self) -> int:
        """Side S of the square input, pixels."""

    @property
    def grid(self) -> int:
        """Side g of the dense feature grid."""


@dataclass(frozen=True)
class InputGeometry:
    """An InputShape as plain data: what a decode task receives instead of the spec (whose module imports torch)."""

    image_size: int
    grid: int

    @classmethod
    def of(cls, shape: InputShape) -> "InputGeometry":
        """The geometry of an encoder spec."""
        return cls(shape.image_size, shape.grid)


def _area_matrix(size: int, cells: int) -> np.ndarray:
    """(cells, size) float32: fraction of cell i covered by pixel j, so each row sums to 1."""
    edges = np.arange(cells + 1, dtype=np.float64) * (size / cells)  # cell boundaries in pixels
    pixels = np.arange(size, dtype=np.float64)
    overlap = np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels)
    return (np.clip(overlap, 0.0, None) * (cells / size)).astype(np.float32)


def prepare_image(image: np.ndarray, masks: list[np.ndarray], spec: InputShape) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 + n (H, W) bool masks → (S, S, 3) uint8 (bicubic, no crop), (n, g, g) float32 cell coverage."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"prepare_image takes an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    size, grid = spec.image_size, spec.grid
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    # PIL's BOX filter weighs whole pixels by their centres, which is not an area average when the
    # scale is not an integer; these matrices give each pixel its exact overlap with each cell
    rows, cols = _area_matrix(h, grid), _area_matrix(w, grid)
    soft = np.empty((len(masks), grid, grid), np.float32)
    for i, mask in enumerate(masks):  # one (H, W) float copy at a time keeps memory flat on big images
        if mask.shape != (h, w):
            raise ValueError(f"mask {i} has shape {mask.shape}, the image is {(h, w)}")
        soft[i] = rows @ mask.astype(np.float32) @ cols.T
    return resized, soft
