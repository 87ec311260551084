"""open_clip CLIP encoders: dense patch features projected into the joint image-text space, and text."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from bank_builder.encoders.base import Encoder, EncoderSpec
from bank_builder.encoders.registry import autocast, pixels_to_tensor


_MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _model_config(entry: dict[str, Any]) -> dict[str, Any]:
    """open_clip's model config for the entry's architecture: the entry's own (registered with open_clip on
    first use in this process), else one open_clip ships. ValueError when there is none, or when the entry's
    differs from the one open_clip already holds under that name."""
    arch, own = entry["architecture"], entry.get("model_config")
    if own is not None and not all(k in own for k in _MODEL_CONFIG_KEYS):
        raise ValueError(f"encoder {entry['name']!r}: its model_config needs the keys {list(_MODEL_CONFIG_KEYS)} "
                         "(an open_clip model config)")
    known = open_clip.get_model_config(arch)
    if own is not None and known is None:
        _add_model_config(arch, own)
        known = open_clip.get_model_config(arch)
    if known is None:
        raise ValueError(f"encoder {entry['name']!r}: open_clip has no model config {arch!r}; give the entry a "
                         "model_config (the architecture's open_clip JSON)")
    if own is not None and known != own:
        raise ValueError(f"encoder {entry['name']!r}: its model_config differs from the {arch!r} open_clip already "
                         "holds (built in, or from another entry); give the architecture a name of its own")
    return known


def _add_model_config(arch: str, config: dict[str, Any]) -> None:
    """Register a model config by content: open_clip's public API reads configs from files named after the
    architecture, so it goes through a temporary one."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{arch}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


def check_entry(entry: dict[str, Any]) -> None:
    """ValueError when the entry's architecture, pretrained tag and preprocessing do not belong together."""
    cfg = _model_config(entry)
    tag = entry["pretrained"]
    if tag is None:
        return
    tag_cfg = open_clip.get_pretrained_cfg(entry["architecture"], tag)
    if not tag_cfg:
        raise ValueError(f"encoder {entry['name']!r}: {entry['architecture']} has no pretrained tag {tag!r}; "
                         f"known: {open_clip.list_pretrained_tags_by_model(entry['architecture'])}")
    # a tag trained with QuickGELU run on a GELU config (or back) loads fine and gives wrong features
    if bool(tag_cfg.get("quick_gelu", False)) != bool(cfg.get("quick_gelu", False)):
        raise ValueError(f"encoder {entry['name']!r}: tag {tag!r} needs quick_gelu={tag_cfg.get('quick_gelu', False)} "
                         f"but {entry['architecture']} has quick_gelu={cfg.get('quick_gelu', False)}; "
                         "use the '-quickgelu' architecture variant (or drop it)")
    for key in ("mean", "std"):
        if key in tag_cfg and not np.allclose(tag_cfg[key], entry[key], atol=1e-6):
            raise ValueError(f"encoder {entry['name']!r}: {key} {entry[key]} differs from tag {tag!r}: {tag_cfg[key]}")


def build_model(entry: dict[str, Any], tag: str | None = None, checkpoint: str | None = None) -> torch.nn.Module:
    """The CLIP model on cpu: random init (seeded by the caller), the pretrained `tag`, or a `checkpoint` file."""
    _model_config(entry)
    model = open_clip.create_model(entry["architecture"], pretrained=tag or checkpoint, device="cpu")
    if not isinstance(model.visual, VisionTransformer):
        raise ValueError(f"encoder {entry['name']!r}: dense features need open_clip's VisionTransformer "
                         f"visual tower, {entry['architecture']} has {type(model.visual).__name__}")
    return model


def model_dims(model: torch.nn.Module) -> dict[str, int | None]:
    """The built model's image size, patch size and output dims, to check against the registry entry."""
    visual = model.visual
    text_proj = getattr(model, "text", model).text_projection  # CLIP keeps its text tower inline
    text_dim = text_proj.out_features if isinstance(text_proj, torch.nn.Linear) else text_proj.shape[1]
    return {"image_size": visual.image_size[0], "patch_size": visual.patch_size[0],
            "visual_dim": visual.proj.shape[1], "text_dim": text_dim}


def dense_features(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels → (B, visual_dim, g, g): the last block's patch tokens after ln_post, each
    mapped by the projection the class token gets (differentiable; `encode_dense` and fitting share it)."""
    tokens = visual.forward_intermediates(
        x, indices=1, normalize_intermediates=True, intermediates_only=True)["image_intermediates"][-1]
    return torch.einsum("bwhv,wd->bdhv", tokens, visual.proj)


class OpenClipEncoder(Encoder):
    """A CLIP ViT whose patch tokens are mapped by the visual projection into the text-comparable space."""

    def __init__(self, model: torch.nn.Module, spec: EncoderSpec, device: torch.device):
        self.model, self.spec, self.device = model, spec, device
        self.tokenizer = open_clip.get_tokenizer(spec.architecture)

    @torch.inference_mode()
    def encode_dense(self, images: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 → (B, visual_dim, g, g) float32 on `self.device`: last block, ln_post, then proj."""
        x = pixels_to_tensor(images, self.spec, self.device)
        with autocast(self.device):
            dense = dense_features(self.model.visual, x)
        return dense.float()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """N texts → (N, text_dim) float32, L2-normalised."""
        if not texts:
            return np.zeros((0, self.spec.text_dim), np.float32)
        tokens = self.tokenizer(texts).to(self.device)
        with autocast(self.device):
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu().numpy()


ENCODER_CLASS = OpenClipEncoder
