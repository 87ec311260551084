"""Scoring label maps against a corpus's ground truth: class maps from instance masks, dataset mIoU."""

from __future__ import annotations

import numpy as np

from bank_builder.records import Sample


def class_map(sample: Sample, classes: list[str]) -> np.ndarray:
    """(H, W) int64 ground truth of an instance-mask sample: 1 + index into `classes`, 0 = unlabelled (ignored)."""
    out = np.zeros(sample.mask.shape, np.int64)
    for entry in sample.meta.get("segments", []):
        if entry["label"] in classes:
            out[sample.mask == entry["id"]] = classes.index(entry["label"]) + 1
    return out


def mean_iou(predictions: list[np.ndarray], truths: list[np.ndarray], classes: int) -> float:
    """Dataset mIoU over the classes present in truth or prediction; unlabelled truth pixels are ignored."""
    inter, union = np.zeros(classes + 1), np.zeros(classes + 1)
    for pred, truth in zip(predictions, truths):
        pred = np.where(truth > 0, pred, 0)
        for c in range(1, classes + 1):
            inter[c] += np.sum((pred == c) & (truth == c))
            union[c] += np.sum((pred == c) | (truth == c))
    seen = union[1:] > 0
    return float((inter[1:][seen] / union[1:][seen]).mean())
