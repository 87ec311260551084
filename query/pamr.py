"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020, "Single-stage semantic segmentation from
image labels"): per-pixel class maps smoothed over local neighbourhoods weighted by colour affinity.

Region scores painted onto pixels are flat inside a region and jump at its boundary, wherever the superpixel put
it; a region whose embedding mixed in a neighbour's (the encoder's coarse grid) drags its whole area along. A few
iterations of m_i ← Σ_j α_ij m_j, over the 8 neighbours at each of several dilations, with α_i = softmax over j
of −|I_i − I_j| / (w · σ_i) (σ_i: the colour standard deviation over i's neighbourhood, per channel; the
affinity is the mean over channels), let scores flow inside areas of one colour and stop at colour edges.
PAMR is linear in the maps, so refining painted scores and then averaging windows is the same as the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RefineConfig:
    """PAMR options. iterations: smoothing steps; dilations: neighbourhood rings in pixels (8 neighbours each, at
    the working size); temperature: vocabulary cosines become per-pixel class probabilities softmax(cos / T)
    before refinement (vote shares and foreground scores are refined as they are); affinity_scale: w above (the
    paper's 0.1; smaller = sharper colour edges)."""

    iterations: int = 10
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    temperature: float = 0.05
    affinity_scale: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        if self.iterations < 1 or not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"RefineConfig needs iterations ≥ 1 and dilations ≥ 1 pixel, got {self.iterations}, "
                             f"{self.dilations}")
        if self.temperature <= 0 or self.affinity_scale <= 0:
            raise ValueError(f"RefineConfig temperature and affinity_scale must be > 0, got {self.temperature}, "
                             f"{self.affinity_scale}")


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """The (dy, dx) of the 8 neighbours at each dilation."""
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in ring]


class _Shifts:
    """Views of a (C, h, w) tensor, edge-padded once, at each (dy, dx) from every pixel."""

    def __init__(self, planes: torch.Tensor, pad: int) -> None:
        self.shape, self.pad = planes.shape[1:], pad
        self.padded = F.pad(planes[None], (pad, pad, pad, pad), mode="replicate")[0]

    def at(self, offset: tuple[int, int]) -> torch.Tensor:
        """The (C, h, w) view at `offset`."""
        (dy, dx), (h, w), pad = offset, self.shape, self.pad
        return self.padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def _affinity(image: np.ndarray, config: RefineConfig) -> torch.Tensor:
    """(N, h, w) float32 tensor of `colour_affinity`."""
    pixels = torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1).float() / 255  # (3, h, w), from a copy
    shifts, offsets = _Shifts(pixels, max(config.dilations)), _offsets(config.dilations)
    # the paper's σ: over the 9 pixels of each dilated 3×3 window (the centre once per dilation), from running sums
    # so that no (N, 3, h, w) stack is made
    count = len(offsets) + len(config.dilations)
    total, squares = len(config.dilations) * pixels, len(config.dilations) * pixels ** 2
    for offset in offsets:
        neighbour = shifts.at(offset)
        total += neighbour
        squares.addcmul_(neighbour, neighbour)
    sigma = (squares / count - (total / count) ** 2).clamp_min_(0).sqrt_()
    scale = 1 / (1e-8 + config.affinity_scale * sigma)  # (3, h, w)
    logits = torch.stack([-((shifts.at(o) - pixels).abs_().mul_(scale)).mean(dim=0) for o in offsets])
    return torch.softmax(logits, dim=0)


def colour_affinity(image: np.ndarray, config: RefineConfig = RefineConfig()) -> np.ndarray:
    """(h, w, 3) uint8 image → (N, h, w) float32 weights α of each pixel's N = 8·len(dilations) neighbours (edge
    pixels repeated past the border), each pixel's weights summing to 1."""
    return _affinity(image, config).numpy()


def refine_maps(maps: np.ndarray, image: np.ndarray, config: RefineConfig = RefineConfig()) -> np.ndarray:
    """(h, w, K) float32 per-pixel maps (probabilities or scores) refined by `config.iterations` PAMR steps over
    the (h, w, 3) uint8 image's colour affinity → (h, w, K) float32 (a constant map stays constant)."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3 or maps.shape[:2] != image.shape[:2]:
        raise ValueError(f"maps {maps.shape} must be (h, w, K) over the image's {image.shape[:2]} pixels")
    # torch rather than numpy: each step's multiply-adds run in place over class planes (K, h, w), ~4× faster
    weights, offsets = _affinity(image, config), _offsets(config.dilations)
    planes = torch.from_numpy(np.array(maps.transpose(2, 0, 1), order="C"))  # a writable C-order copy
    for _ in range(config.iterations):
        shifts = _Shifts(planes, max(config.dilations))
        planes = torch.zeros_like(planes)
        for weight, offset in zip(weights, offsets):
            planes.addcmul_(weight, shifts.at(offset))
    return planes.permute(1, 2, 0).contiguous().numpy()


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """(..., K) scores → (..., K) float32 softmax(scores / temperature) over the last axis."""
    logits = np.asarray(scores, np.float64) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
