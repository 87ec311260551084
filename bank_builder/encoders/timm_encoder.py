"""timm ViT encoders (DINOv2 and the like): dense patch features, no text tower."""

from __future__ import annotations

from typing import Any

import numpy as np
import timm
import torch

from bank_builder.encoders.base import Encoder, EncoderSpec
from bank_builder.encoders.registry import autocast, pixels_to_tensor


def _timm_name(entry: dict[str, Any]) -> str:
    """`architecture.tag`, the name timm resolves pretrained weights by (the bare architecture without a tag)."""
    tag = entry["pretrained"]
    return f"{entry['architecture']}.{tag}" if tag else entry["architecture"]


def check_entry(entry: dict[str, Any]) -> None:
    """ValueError when timm does not know the entry's model, its pretrained tag, or uses other preprocessing."""
    name = _timm_name(entry)
    if not timm.is_model(entry["architecture"]):
        raise ValueError(f"encoder {entry['name']!r}: timm has no model {entry['architecture']!r}")
    if entry["pretrained"] is None:
        return
    # without this, timm would build a model whose tag has no weights source and only log a warning
    if name not in timm.list_pretrained(name):
        raise ValueError(f"encoder {entry['name']!r}: timm has no pretrained weights {name!r}")
    cfg = timm.models.get_pretrained_cfg(name)
    for key in ("mean", "std"):
        if not np.allclose(getattr(cfg, key), entry[key], atol=1e-6):
            raise ValueError(f"encoder {entry['name']!r}: {key} {entry[key]} differs from {name}: {getattr(cfg, key)}")


def build_model(entry: dict[str, Any], tag: str | None = None, checkpoint: str | None = None) -> torch.nn.Module:
    """The ViT on cpu: random init (seeded by the caller), the pretrained `tag`, or a `checkpoint` file."""
    kwargs = dict(entry.get("model_kwargs") or {})
    if checkpoint is not None:
        # a file overlay makes timm read the checkpoint (and resample position embeddings) instead of the hub
        return timm.create_model(_timm_name(entry), pretrained=True, pretrained_cfg_overlay={"file": checkpoint},
                                 **kwargs)
    if tag is not None:
        return timm.create_model(f"{entry['architecture']}.{tag}", pretrained=True, **kwargs)
    return timm.create_model(entry["architecture"], pretrained=False, **kwargs)


def model_dims(model: torch.nn.Module) -> dict[str, int | None]:
    """The built model's image size, patch size and feature dim, to check against the registry entry."""
    embed = model.patch_embed
    return {"image_size": embed.img_size[0], "patch_size": embed.patch_size[0], "visual_dim": model.embed_dim,
            "text_dim": None}


class TimmEncoder(Encoder):
    """A timm ViT whose final-norm patch tokens (prefix tokens dropped) are the dense features."""

    def __init__(self, model: torch.nn.Module, spec: EncoderSpec, device: torch.device):
        self.model, self.spec, self.device = model, spec, device

    @torch.inference_mode()
    def encode_dense(self, images: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 → (B, visual_dim, g, g) float32 on `self.device`: last block after the final norm."""
        x = pixels_to_tensor(images, self.spec, self.device)
        with autocast(self.device):
            # forward_intermediates drops the num_prefix_tokens (class, registers) and reshapes to NCHW
            dense = self.model.forward_intermediates(
                x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]
        return dense.float()

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Always raises: a vision-only encoder has no text tower."""
        raise ValueError(f"encoder {self.spec.name!r} has no text tower ({self.spec.architecture} is vision-only); "
                         "use a CLIP-style encoder such as clip-vit-b16 to embed label text")


ENCODER_CLASS = TimmEncoder
