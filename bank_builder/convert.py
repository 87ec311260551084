"""`refbank convert`: a public segmentation dataset in its released folder layout → corpus shards in the project's
convention (docs/CORPUS.md), which `refbank build --mask-kind class` reads.

Each sample becomes `<key>.<jpg|png>` (the image file's bytes, unchanged), `<key>.mask.png` (8-bit class ids of
the benchmark's class table, `datasets.IGNORE` for unlabelled pixels) and `<key>.json` (`classes` {id: name},
`source`, `split`, `file`). Shards are `<out>/<dataset>-<split>-<i:06d>.tar`, `samples_per_shard` images each,
in sorted image order, written in one put each, so the same input gives the same bytes. An image without a
usable mask is skipped and counted by reason, never a crash.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from bank_builder.datasets import LAYOUTS, Layout
from bank_builder.shard_writer import json_bytes, png_bytes, tar_bytes


@dataclass(frozen=True)
class ConvertConfig:
    """dataset: a key of `datasets.LAYOUTS`; split: one of that layout's splits; samples_per_shard: images per tar."""

    dataset: str
    split: str
    samples_per_shard: int = 1000

    def layout(self) -> Layout:
        """The dataset's layout; ValueError listing the known datasets / splits when either is unknown."""
        if self.dataset not in LAYOUTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; use one of: {', '.join(sorted(LAYOUTS))}")
        layout = LAYOUTS[self.dataset]
        if self.split not in layout.splits:
            raise ValueError(f"{self.dataset} has no split {self.split!r}; use one of: {', '.join(layout.splits)}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: use at least 1")
        return layout


@dataclass
class ConvertReport:
    """What `convert` wrote: shard URLs (sorted), samples written, skipped images by reason with one example
    file per reason, and the number of classes in the table every sample's json carries."""

    dataset: str
    split: str
    shards: list[str]
    samples: int
    classes: int
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)


class _Skip(Exception):
    """An image that cannot become a sample; the message is the reason counted in the report."""


def _stems(root: Path, layout: Layout, split: str) -> list[str]:
    """Image stems of the split: its list file's lines, or every image in the image folder; sorted."""
    images = root / layout.images.format(split=split)
    if not images.is_dir():
        raise ValueError(f"{images} is not a folder: point ROOT at the dataset folder that holds "
                         f"{layout.images.format(split=split)}/ and {layout.masks.format(split=split)}/ "
                         f"(the {layout.name} layout)")
    if layout.split_list is None:
        suffix = layout.image_suffix
        return sorted(p.name[:-len(suffix)] for p in images.iterdir() if p.name.endswith(suffix))
    listing = root / layout.split_list.format(split=split)
    if not listing.is_file():
        raise ValueError(f"{listing} is missing: the {layout.name} layout lists the images of split {split!r} there")
    return sorted({line.split()[0] for line in listing.read_text().splitlines() if line.strip()})


def _mask(root: Path, layout: Layout, split: str, stem: str) -> np.ndarray:
    """(H, W) uint8 class ids of an image (datasets.IGNORE where unlabelled); _Skip when there is none to use."""
    folder = root / layout.masks.format(split=split)
    for suffix, lookup in zip(layout.mask_suffixes, layout.lookups):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            with Image.open(path) as mask:
                if mask.mode not in ("L", "P"):  # P: VOC's palette PNGs, whose pixels are the indices
                    raise _Skip(f"mask is not 8-bit class ids (PNG mode {mask.mode})")
                return lookup[np.asarray(mask)]
    raise _Skip("no mask")


def _sample(root: Path, layout: Layout, split: str, stem: str, classes: dict[str, str]) -> list[tuple[str, bytes]]:
    """The tar members of one image: image bytes as stored, mapped class mask, json."""
    image = root / layout.images.format(split=split) / f"{stem}{layout.image_suffix}"
    if not image.is_file():
        raise _Skip("image listed but missing")
    mask = _mask(root, layout, split, stem)
    try:
        with Image.open(image) as opened:  # reads the header only
            size = opened.size
    except OSError:
        raise _Skip("undecodable image") from None
    if size != (mask.shape[1], mask.shape[0]):
        raise _Skip("mask size differs from the image")
    key = f"{split}-{stem}".replace(".", "_")  # WebDataset keys end at the first dot
    meta = {"classes": classes, "source": layout.name, "split": split,
            "file": str(image.relative_to(root))}
    return [(f"{key}{layout.image_suffix}", image.read_bytes()), (f"{key}.mask.png", png_bytes(mask)),
            (f"{key}.json", json_bytes(meta))]


def convert(root: str | Path, out: str, config: ConvertConfig,
            storage_options: dict[str, Any] | None = None) -> ConvertReport:
    """Convert split `config.split` of the dataset under local folder `root` into tar shards under `out` (local
    path, file://, s3://bucket/prefix; fsspec `storage_options`)."""
    layout = config.layout()
    root = Path(root)
    stems = _stems(root, layout, config.split)
    if not stems:
        raise ValueError(f"split {config.split!r} of {root} lists no image; check ROOT and the split")
    classes = {str(i): name for i, name in enumerate(layout.classes)}
    fs, base = fsspec.core.url_to_fs(out, **(storage_options or {}))
    fs.makedirs(base, exist_ok=True)
    report = ConvertReport(dataset=layout.name, split=config.split, shards=[], samples=0, classes=len(classes))
    skipped: Counter[str] = Counter()
    members: list[tuple[str, bytes]] = []
    in_shard = 0

    def flush() -> None:
        name = f"{layout.name}-{config.split}-{len(report.shards):06d}.tar"
        fs.pipe_file(f"{base.rstrip('/')}/{name}", tar_bytes(members))
        report.shards.append(f"{out.rstrip('/')}/{name}")

    for stem in stems:
        try:
            members.extend(_sample(root, layout, config.split, stem, classes))
            in_shard += 1
        except _Skip as reason:
            skipped[str(reason)] += 1
            report.examples.setdefault(str(reason), stem)
        if in_shard == config.samples_per_shard:
            flush()
            members, in_shard = [], 0
    if in_shard:
        flush()
    report.samples = len(stems) - sum(skipped.values())
    report.skipped = dict(sorted(skipped.items()))
    return report
