"""Mask pooling of dense features → one visual embedding per segment; text embeddings per label.

Conventions: images are squashed (no crop) to the encoder's S×S input so masks stay aligned; a
segment's soft mask on the g×g feature grid is the exact fraction of each cell it covers (both made by
`prepare.prepare_image`, torch-free, which decode tasks run); visual
embeddings are the area-weighted mean of the cells' features, L2-normalised, stored as float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bank_builder.encoders.base import Encoder
from bank_builder.encoders.registry import to_device
from bank_builder.prepare import prepare_image  # noqa: F401  (re-exported: the builder and the query side pool alike)

TEXT_TEMPLATE = "a photo of a {}."  # prompt for label text; the query side reuses it


def pool_tensors(features: torch.Tensor, soft_masks: torch.Tensor,
                 image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pool_segments` in torch (differentiable, on the features' device): visual (n, C) float32 L2-normalised,
    quality (n,) float32."""
    b, c, gh, gw = features.shape
    n = soft_masks.shape[0]
    if soft_masks.shape[1:] != (gh, gw) or image_index.shape != (n,):
        raise ValueError(f"soft masks {tuple(soft_masks.shape)} and image index {tuple(image_index.shape)} "
                         f"do not fit features {tuple(features.shape)}")
    index = image_index.to(features.device, torch.int64)
    if n and (index.min() < 0 or index.max() >= b):
        raise ValueError(f"image_index must lie in [0, {b}), "
                         f"got values in [{index.min().item()}, {index.max().item()}]")
    weights = soft_masks.to(features.device, torch.float32).reshape(n, gh * gw)
    total = weights.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("a soft mask covers no feature cell; drop empty segments before pooling")
    # block weights (n, B, g*g): each segment's weights sit in its own image's row, zeros elsewhere, so
    # one einsum pools every segment of the batch without copying a feature map per segment
    block = torch.zeros(n, b, gh * gw, device=features.device)
    block[torch.arange(n, device=features.device), index] = weights / total
    cells = features.float().reshape(b, c, gh * gw)
    pooled = F.normalize(torch.einsum("nbp,bcp->nc", block, cells), dim=1)
    # weights sum to 1, so Σ w·cos(cell, pooled) = pooled · (Σ w · unit cell)
    mean_unit_cell = torch.einsum("nbp,bcp->nc", block, F.normalize(cells, dim=1))
    quality = (pooled * mean_unit_cell).sum(dim=1)
    return pooled, quality


def pool_segments(features: torch.Tensor, soft_masks: torch.Tensor,
                  image_index: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, g, g) float32 features, (n, g, g) soft masks, (n,) int64 image of each mask → visual (n, C) float16
    L2-normalised, quality (n,) float32 = area-weighted mean cosine between each cell and the pooled vector."""
    pooled, quality = pool_tensors(features, soft_masks, image_index)
    return pooled.half().cpu().numpy(), quality.cpu().numpy()


def embed_labels(encoder: Encoder, labels: list[str | None],
                 cache: dict[str, np.ndarray]) -> list[np.ndarray | None]:
    """One (text_dim,) float16 L2-normalised vector per label (None for None, or without a text tower);
    labels missing from `cache` are encoded and added to it."""
    if encoder.spec.text_dim is None:
        return [None] * len(labels)
    for label in sorted({label for label in labels if label is not None and label not in cache}):
        # One label per call: a batched call's result depends (in the last bit) on which other labels
        # share the batch, i.e. on the cache's history, and a resumed build must reproduce a clean one.
        vector = encoder.encode_text([TEXT_TEMPLATE.format(label)])[0]
        vector = (vector / np.linalg.norm(vector)).astype(np.float16)
        vector.flags.writeable = False  # shared by every segment with this label
        cache[label] = vector
    return [None if label is None else cache[label] for label in labels]


@dataclass
class BatchEmbeddings:
    """What an encoder call returns for one batch of segments."""

    visual: np.ndarray  # (n, C) float16, L2-normalised
    quality: np.ndarray  # (n,) float32, weighted mean cosine of the segment's cells to its embedding
    text: list[np.ndarray | None]  # per segment: (text_dim,) float16 L2-normalised, or None


def encode_batch(encoder: Encoder, images: np.ndarray, soft_masks: np.ndarray, image_index: np.ndarray,
                 labels: list[str | None], cache: dict[str, np.ndarray]) -> BatchEmbeddings:
    """(B, S, S, 3) uint8 images, (n, g, g) float32 soft masks, (n,) int64 image index, n labels → embeddings."""
    n = len(soft_masks)
    if len(image_index) != n or len(labels) != n:
        raise ValueError(f"{n} soft masks, {len(image_index)} image indices and {len(labels)} labels must match")
    if n == 0:  # nothing to pool: skip the forward pass
        return BatchEmbeddings(np.zeros((0, encoder.spec.visual_dim), np.float16), np.zeros(0, np.float32), [])
    features = encoder.encode_dense(images)
    with torch.inference_mode():
        visual, quality = pool_segments(features, to_device(soft_masks, features.device),
                                        to_device(image_index, features.device))
    return BatchEmbeddings(visual, quality, embed_labels(encoder, labels, cache))
