"""The one interface every encoder implements, and the spec a bank records about it."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class EncoderSpec:
    """What produced a bank's embeddings; written into every part and manifest, checked on open.

    weights: the pretrained tag, timm name or checkpoint path that was loaded, or "untrained".
    untrained: True when the weights are seeded random ones (then `seed` says which).
    image_size: square input side in pixels; patch_size: pixels per feature cell, so the dense
    feature grid is (image_size // patch_size) squared. visual_dim: channels C of the dense features
    (the joint image-text space for CLIP-style encoders). text_dim: None when there is no text tower.
    entry: the whole registry entry that built it (an open_clip model_config as content), so a reader
    rebuilds the same encoder from the bank alone; None in banks built before it was recorded.
    note: what the registry entry says the model is (e.g. a stand-in fitted on generated data), or None;
    left out of `to_dict` when None, so specs of entries without one are unchanged.
    """

    name: str
    family: str
    architecture: str
    weights: str
    untrained: bool
    seed: int | None
    image_size: int
    patch_size: int
    visual_dim: int
    text_dim: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    entry: dict[str, Any] | None = field(default=None, hash=False)
    note: str | None = None

    @property
    def grid(self) -> int:
        """Side of the dense feature grid."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)  # deep-copies the entry
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if d["note"] is None:
            del d["note"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSpec":
        """Inverse of `to_dict` (a dict without `entry` gives entry None)."""
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"]), "entry": copy.deepcopy(d.get("entry"))})


class Encoder(ABC):
    """Dense visual features and text features from one model."""

    spec: EncoderSpec
    device: torch.device

    @abstractmethod
    def encode_dense(self, images: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 RGB, S = spec.image_size → (B, C, h, w) float32 on `self.device`, not normalised."""

    @abstractmethod
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """N label texts → (N, text_dim) float32, L2-normalised; raises if the encoder has no text tower."""
