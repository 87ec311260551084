"""Ground truth of a bank built from a generated corpus: the class under each segment, the class each label names.

Scenes are regenerated from the corpus config (`iter_scenes`), so this works for every mask kind, superpixel
builds included (their shards hold no mask). A segment's class is the majority of the pixels under its mask,
unlabelled pixels (clutter, id 0) counting as a class of their own that no label names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from bank_builder.format import BankRef, Manifest, parts
from bank_builder.phrases import normalise_phrase
from bank_builder.synthetic.scenes import Scene, class_names, class_phrases

UNLABELLED = "(unlabelled)"  # the majority "class" of a segment lying mostly on unlabelled pixels


@functools.lru_cache(maxsize=1)
def _label_classes() -> dict[str, str]:
    table = {normalise_phrase(p): name for name, phrases in class_phrases().items() for p in phrases}
    return {**table, **{name: name for name in class_names()}}


def label_class(label: str | None) -> str | None:
    """The class a bank label names: a class name, or one of its caption phrases as pairing normalises them."""
    return None if label is None else _label_classes().get(label)


def segment_class(scene: Scene, rle: dict[str, Any]) -> str:
    """The majority class of the pixels under a segment's mask (COCO RLE {"size", "counts"} of `scene`'s image)."""
    mask = mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()}).astype(bool)
    ids, counts = np.unique(scene.instances[mask], return_counts=True)
    votes: dict[str, int] = {}
    for instance, count in zip(ids.tolist(), counts.tolist()):
        name = scene.labels.get(instance, UNLABELLED)
        votes[name] = votes.get(name, 0) + count
    return max(sorted(votes), key=lambda name: votes[name])


@dataclass
class SegmentTruth:
    """Per segment of a bank version, in part order: its id, image key, label and label source as stored, the
    class its label names (None: unlabelled, or a label naming no class) and the class under it."""

    segment_id: np.ndarray  # (n,) int64
    image_key: list[str]
    label: list[str | None]
    label_source: list[str]
    named: list[str | None]
    truth: list[str]

    @property
    def right(self) -> np.ndarray:
        """(n,) bool: the label names the class under the segment."""
        return np.array([n is not None and n == t for n, t in zip(self.named, self.truth)], bool)


def bank_truth(ref: BankRef, manifest: Manifest, scenes: dict[str, Scene]) -> SegmentTruth:
    """The truth of every segment of `manifest`'s parts; `scenes`: image key → its regenerated scene."""
    columns = ["segment_id", "image_key", "label", "label_source", "mask"]
    ids, keys, labels, sources, truth = [], [], [], [], []
    for part in manifest.parts:
        for table in parts.iter_row_groups(ref, part, columns):
            ids.append(table["segment_id"].to_numpy())
            keys += table["image_key"].to_pylist()
            labels += table["label"].to_pylist()
            sources += table["label_source"].to_pylist()
            truth += [segment_class(scenes[k], rle) for k, rle in zip(table["image_key"].to_pylist(),
                                                                      table["mask"].to_pylist())]
    return SegmentTruth(np.concatenate(ids) if ids else np.zeros(0, np.int64), keys, labels, sources,
                        [label_class(label) for label in labels], truth)


def scene_class_map(scene: Scene) -> np.ndarray:
    """(H, W) int64 ground truth of a scene: 1 + index into class_names(), 0 = unlabelled (jobs.evaluate's)."""
    names = class_names()
    truth = np.zeros(scene.instances.shape, np.int64)
    for instance, label in scene.labels.items():
        truth[scene.instances == instance] = names.index(label) + 1
    return truth
