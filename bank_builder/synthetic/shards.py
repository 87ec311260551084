"""Encode synthetic scenes as WebDataset samples and write them as deterministic tar shards.

Layout (the corpus convention, docs/CORPUS.md): `{url}/train-{i:06d}.tar` and `{url}/heldout-{i:06d}.tar`;
sample key `{split}-{shard:06d}-{sample:06d}`; members `<key>.jpg|png`, `<key>.json`, and by mask
kind `<key>.mask.png` or `<key>.rle.json`.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from bank_builder.config import MaskKind
from bank_builder.shard_writer import json_bytes, png_bytes, tar_bytes
from bank_builder.synthetic.captions import Caption, check_rates, noisy_caption
from bank_builder.synthetic.scenes import BACKGROUND_CLASSES, Scene, class_names, make_scene

SOURCE_TAG = "refbank-synthetic"
CLASS_IGNORE = 255  # class masks: unlabeled pixels
_SPLIT_STREAMS = {"train": 0, "heldout": 1}  # part of every sample's seed: the splits never share images
_CAPTION_STREAM = 1  # appended to a sample's seed for its noisy caption, so captions never change the image
_LABEL_STREAM = 2  # ... and for its wrong labels, so they change neither the image nor the caption
_LABELLED_KINDS = (MaskKind.INSTANCE, MaskKind.RLE)  # kinds whose labels are per instance (wrong_label_rate)
_IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}


@dataclass(frozen=True)
class CorpusConfig:
    """Size, look and annotation format of a synthetic corpus; same config + seed = same bytes."""

    shards: int = 4
    samples_per_shard: int = 32
    image_size: int = 256  # square images, pixels
    mask_kind: MaskKind = MaskKind.INSTANCE
    image_format: str = "jpg"  # "jpg" or "png"
    heldout_shards: int = 0  # extra shards for evaluation, disjoint random stream
    min_objects: int = 1
    max_objects: int = 5
    seed: int = 0
    # captions=True: the json's caption / phrases come from captions.noisy_caption (phrase variants, these
    # rates of wrong and missing phrases, the truth in `caption_truth`); False: the clean caption, phrases
    # = the labels present
    captions: bool = False
    wrong_phrase_rate: float = 0.0
    missing_phrase_rate: float = 0.0
    # chance that an instance's label (json `segments`, rle.json `label`) names another class, drawn uniformly;
    # the true class of each such instance goes in the json's `label_truth` ({"<id>": class}); images, masks and
    # captions stay the same bytes; training shards only (held-out labels stay true, to score a bank against)
    wrong_label_rate: float = 0.0


@dataclass
class CorpusSummary:
    """What `make_corpus` wrote. samples / segments / class_counts count the training shards only
    (held-out shards are for evaluation); segments = labelled instances, background texture included."""

    shards: list[str]  # URLs of the training shards written, sorted
    heldout: list[str]  # URLs of the held-out shards written, sorted
    samples: int
    segments: int  # labelled segments written (instances visible in the images)
    class_counts: dict[str, int] = field(default_factory=dict)  # class name -> segments, sorted by name


def sample_key(split: str, shard: int, sample: int) -> str:
    """The WebDataset key of a sample, e.g. 'train-000003-000017' (no dots)."""
    return f"{split}-{shard:06d}-{sample:06d}"


def _validate(config: CorpusConfig) -> CorpusConfig:
    """The config with `mask_kind` as a MaskKind; ValueError that names the fix for a bad value."""
    if config.image_format not in _IMAGE_FORMATS:
        raise ValueError(f"image_format={config.image_format!r}: use one of {sorted(_IMAGE_FORMATS)}")
    if config.image_size < 32:
        raise ValueError(f"image_size={config.image_size}: use at least 32 pixels")
    if config.shards < 0 or config.heldout_shards < 0 or config.samples_per_shard < 1:
        raise ValueError("shards and heldout_shards must be >= 0 and samples_per_shard >= 1")
    if not 0 <= config.min_objects <= config.max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {config.min_objects}..{config.max_objects}")
    check_rates(config.wrong_phrase_rate, config.missing_phrase_rate)
    if not 0.0 <= config.wrong_label_rate <= 1.0:
        raise ValueError(f"wrong_label_rate={config.wrong_label_rate}: use a probability in [0, 1]")
    if not config.captions and (config.wrong_phrase_rate or config.missing_phrase_rate):
        raise ValueError("wrong / missing phrase rates apply to noisy captions: use captions=True (--captions)")
    # auto is how a build reads a mixed corpus; a corpus is written in one kind
    written = [k.value for k in MaskKind if k is not MaskKind.AUTO]
    if config.mask_kind not in written:
        raise ValueError(f"mask_kind={getattr(config.mask_kind, 'value', config.mask_kind)!r}: use one of {written}")
    if config.wrong_label_rate and MaskKind(config.mask_kind) not in _LABELLED_KINDS:
        raise ValueError(f"wrong_label_rate applies to labelled instances: use mask_kind instance or rle, not "
                         f"{MaskKind(config.mask_kind).value}")
    return replace(config, mask_kind=MaskKind(config.mask_kind))


def _image_bytes(image: np.ndarray, image_format: str) -> bytes:
    """The (H, W, 3) uint8 RGB image encoded as JPEG (quality 90) or PNG."""
    if image_format == "png":
        return png_bytes(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def wrong_labels(rng: np.random.Generator, labels: dict[int, str], rate: float) -> dict[int, str]:
    """`labels` (instance id → class) with each label replaced, with probability `rate`, by another class drawn
    uniformly. Two draws per instance whatever the outcome: a higher rate flips a superset of the instances."""
    names = class_names()
    out = {}
    for instance_id, label in labels.items():
        flip, pick = rng.uniform(size=2)
        others = [n for n in names if n != label]
        out[instance_id] = others[int(pick * len(others))] if flip < rate else label
    return out


def _rle_annotations(scene: Scene, labels: dict[int, str]) -> list[dict[str, Any]]:
    """COCO / SA-1B style annotations of every instance: RLE counts as str, bbox XYWH pixels, area."""
    height, width = scene.instances.shape
    annotations = []
    for instance_id, label in labels.items():
        binary = scene.instances == instance_id
        rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
        rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        annotations.append(
            {
                "id": instance_id,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "label": label,
                "bbox": bbox,
                "area": int(binary.sum()),
            }
        )
    return annotations


def _mask_member(scene: Scene, kind: MaskKind, labels: dict[int, str]) -> tuple[str, bytes] | None:
    """(extension, bytes) of the mask member for `kind`, or None for MaskKind.NONE."""
    if kind is MaskKind.INSTANCE:
        dtype = np.uint8 if max(scene.labels, default=0) <= 255 else np.uint16
        return "mask.png", png_bytes(scene.instances.astype(dtype))
    if kind is MaskKind.CLASS:
        table = np.full(max(scene.labels, default=0) + 1, CLASS_IGNORE, dtype=np.uint8)
        for instance_id, label in scene.labels.items():
            table[instance_id] = class_names().index(label)
        return "mask.png", png_bytes(table[scene.instances])
    if kind is MaskKind.BINARY:
        objects = [i for i, label in scene.labels.items() if label not in BACKGROUND_CLASSES]
        return "mask.png", png_bytes(np.where(np.isin(scene.instances, objects), 255, 0).astype(np.uint8))
    if kind is MaskKind.RLE:
        return "rle.json", json_bytes(_rle_annotations(scene, labels))
    return None


def _metadata(scene: Scene, kind: MaskKind, caption: Caption | None, labels: dict[int, str]) -> dict[str, Any]:
    """The sample's json: caption, phrases, source, the full class table, plus per-kind labels (`labels`, which
    may differ from the scene's: then `label_truth` holds the true class of each such instance); with a noisy
    `caption`, its text and phrases, and the truth about them in `caption_truth`."""
    meta: dict[str, Any] = {
        "caption": scene.caption,
        "phrases": sorted(set(scene.labels.values())),
        "source": SOURCE_TAG,
        "classes": {str(i): name for i, name in enumerate(class_names())},
    }
    if caption is not None:
        meta.update(caption=caption.text, phrases=caption.phrases, caption_truth=caption.truth())
    wrong = {str(i): scene.labels[i] for i, label in labels.items() if label != scene.labels[i]}
    if wrong:
        meta["label_truth"] = wrong
    if kind is MaskKind.INSTANCE:
        meta["segments"] = [{"id": i, "label": label} for i, label in labels.items()]
    elif kind is MaskKind.BINARY:
        meta["label"] = "foreground"
    return meta


def encode_sample(key: str, scene: Scene, config: CorpusConfig = CorpusConfig(),
                  caption: Caption | None = None, labels: dict[int, str] | None = None) -> list[tuple[str, bytes]]:
    """The tar members (name, bytes) of one sample, in the order image, json, mask; a test can
    build a shard from hand-made scenes with these. `caption`: a noisy caption replacing the clean one;
    `labels`: the instance labels to write (default the scene's, i.e. the truth)."""
    config = _validate(config)
    labels = scene.labels if labels is None else labels
    members = [
        (f"{key}.{config.image_format}", _image_bytes(scene.image, config.image_format)),
        (f"{key}.json", json_bytes(_metadata(scene, config.mask_kind, caption, labels))),
    ]
    mask = _mask_member(scene, config.mask_kind, labels)
    if mask is not None:
        members.append((f"{key}.{mask[0]}", mask[1]))
    return members


def iter_scenes(config: CorpusConfig, split: str = "train") -> Iterator[tuple[str, Scene, Caption | None]]:
    """(key, scene, noisy caption or None) of every sample `make_corpus(url, config)` writes in `split`
    ("train" or "heldout"), in shard order; each sample has its own seed, so shards are independent."""
    for key, scene, caption, _ in _iter_samples(config, split):
        yield key, scene, caption


def _iter_samples(config: CorpusConfig, split: str) -> Iterator[tuple[str, Scene, Caption | None, dict[int, str]]]:
    """`iter_scenes` with the instance labels each sample writes (wrong ones at `wrong_label_rate`)."""
    config = _validate(config)
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split={split!r}: use one of {sorted(_SPLIT_STREAMS)}")
    for shard in range(config.shards if split == "train" else config.heldout_shards):
        for index in range(config.samples_per_shard):
            seed = [config.seed, _SPLIT_STREAMS[split], shard, index]
            scene = make_scene(np.random.default_rng(seed), config.image_size, config.min_objects, config.max_objects)
            caption = None
            if config.captions:
                caption = noisy_caption(np.random.default_rng(seed + [_CAPTION_STREAM]), scene.labels,
                                        config.wrong_phrase_rate, config.missing_phrase_rate)
            labels = scene.labels
            if config.wrong_label_rate and split == "train":  # held-out labels stay true: they score the bank
                labels = wrong_labels(np.random.default_rng(seed + [_LABEL_STREAM]), scene.labels,
                                      config.wrong_label_rate)
            yield sample_key(split, shard, index), scene, caption, labels


def make_corpus(url: str, config: CorpusConfig = CorpusConfig(), storage_options: dict | None = None) -> CorpusSummary:
    """Write `config.shards` training and `config.heldout_shards` held-out tar shards under `url`
    (local path, file://, s3://bucket/prefix; fsspec `storage_options`), each in one put."""
    config = _validate(config)
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    base = url.rstrip("/")
    written: dict[str, list[str]] = {"train": [], "heldout": []}
    counts: Counter[str] = Counter()
    samples = 0
    for split in ("train", "heldout"):
        scenes: list[Scene] = []
        members: list[tuple[str, bytes]] = []
        for key, scene, caption, labels in _iter_samples(config, split):
            scenes.append(scene)
            members.extend(encode_sample(key, scene, config, caption, labels))
            if len(scenes) == config.samples_per_shard:  # the shard is complete: one put per shard
                name = f"{key.rsplit('-', 1)[0]}.tar"
                fs.pipe_file(f"{root.rstrip('/')}/{name}", tar_bytes(members))
                written[split].append(f"{base}/{name}")
                if split == "train":
                    samples += len(scenes)
                    counts.update(label for s in scenes for label in s.labels.values())
                scenes, members = [], []
    return CorpusSummary(
        shards=sorted(written["train"]),
        heldout=sorted(written["heldout"]),
        samples=samples,
        segments=sum(counts.values()),
        class_counts=dict(sorted(counts.items())),
    )
