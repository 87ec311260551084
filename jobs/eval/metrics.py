"""Scores accumulated over a held-out corpus: a confusion matrix (mIoU, per-class IoU, pixel accuracy), binary
foreground scores (IoU, F-measure, MAE) and reference-mode trials (precision of "no target" answers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from jobs.eval.truth import IGNORED


class Confusion:
    """Pixel counts (K, K + 1): row = true class, column = predicted class, the last column = no class predicted.
    Truth IGNORED pixels are not counted (mmseg's ignore_index)."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.matrix = np.zeros((len(self.classes), len(self.classes) + 1), np.int64)

    def add(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        """Count one image: (H, W) int truth (class index or IGNORED) and prediction (class index or IGNORED)."""
        if truth.shape != prediction.shape:
            raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in size")
        k = len(self.classes)
        scored = truth != IGNORED
        predicted = np.where(prediction[scored] < 0, k, prediction[scored])
        self.matrix += np.bincount(truth[scored] * (k + 1) + predicted, minlength=k * (k + 1)).reshape(k, k + 1)

    def iou(self) -> np.ndarray:
        """(K,) float64 IoU = TP / (TP + FP + FN) per class, NaN where the class is in neither truth nor
        prediction (mmseg leaves those out of the mean)."""
        tp = np.diag(self.matrix[:, :-1]).astype(np.float64)
        union = self.matrix.sum(axis=1) + self.matrix[:, :-1].sum(axis=0) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def summary(self) -> dict[str, Any]:
        """mIoU (mean over classes in truth or prediction), pixel accuracy (aAcc), mean class accuracy (mAcc),
        per-class IoU (None where undefined), pixels scored, the confusion matrix (rows truth, last column none)."""
        iou = self.iou()
        tp = np.diag(self.matrix[:, :-1])
        rows = self.matrix.sum(axis=1)
        total = int(rows.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(rows > 0, tp / np.maximum(rows, 1), np.nan)
        return {"miou": _mean(iou), "pixel_accuracy": float(tp.sum() / total) if total else None,
                "mean_accuracy": _mean(accuracy), "pixels": total,
                "per_class_iou": {c: (None if np.isnan(v) else round(float(v), 6)) for c, v in zip(self.classes, iou)},
                "confusion": self.matrix.tolist()}


@dataclass
class BinaryScores:
    """Foreground scores: dataset IoU, precision / recall and F-measure (F_β with β² = beta2, 0.3 as in the
    salient-object literature) of the thresholded map; MAE = mean over images of the mean |score − truth|
    of the continuous score map. Truth IGNORED pixels are left out."""

    beta2: float = 0.3
    tp: int = 0
    fp: int = 0
    fn: int = 0
    errors: list[float] = field(default_factory=list)

    def add(self, truth: np.ndarray, score: np.ndarray, threshold: float) -> None:
        """One image: (H, W) truth in {0, 1, IGNORED}, (H, W) float scores in [0, 1]."""
        scored = truth != IGNORED
        fg, predicted = truth[scored] == 1, score[scored] >= threshold
        self.tp += int(np.sum(fg & predicted))
        self.fp += int(np.sum(~fg & predicted))
        self.fn += int(np.sum(fg & ~predicted))
        if scored.any():
            self.errors.append(float(np.abs(score[scored] - fg).mean()))

    def summary(self) -> dict[str, Any]:
        """iou, precision, recall, f_measure, mae, images."""
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else None
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else None
        f = None
        if precision is not None and recall is not None and precision + recall > 0:
            f = (1 + self.beta2) * precision * recall / (self.beta2 * precision + recall)
        union = self.tp + self.fp + self.fn
        return {"iou": self.tp / union if union else None, "precision": precision, "recall": recall,
                "f_measure": f, "beta2": self.beta2, "mae": float(np.mean(self.errors)) if self.errors else None,
                "images": len(self.errors)}


# Edges of the target-size bands (share of the image's labelled pixels) of ReferenceScores' breakdown.
SIZE_BANDS: tuple[float, ...] = (0.02, 0.05, 0.1)


@dataclass
class ReferenceScores:
    """Reference-mode trials: the class present or absent in the target, the answer (exists or "no target"),
    and when present the intersection / union of the predicted mask with the class's true mask and the share of
    the image the class covers."""

    outcomes: list[tuple[bool, bool]] = field(default_factory=list)  # (present, said it exists)
    intersection: int = 0
    union: int = 0
    trial_ious: list[float] = field(default_factory=list)
    found: list[tuple[float, bool]] = field(default_factory=list)  # present trials: (share of the image, exists)

    def add(self, present: bool, exists: bool, truth: np.ndarray | None = None,
            predicted: np.ndarray | None = None, fraction: float | None = None) -> None:
        """One trial; for a present class, (H, W) bool truth (ignored pixels already False in both), prediction
        and the share of the image's labelled pixels the class covers (None: not broken down by size)."""
        self.outcomes.append((present, exists))
        if present:
            inter, union = int(np.sum(truth & predicted)), int(np.sum(truth | predicted))
            self.intersection += inter
            self.union += union
            self.trial_ious.append(inter / union if union else 0.0)
            if fraction is not None:
                self.found.append((float(fraction), bool(exists)))

    def summary(self) -> dict[str, Any]:
        """Trials; no_target_precision = share of "no target" answers given on absent classes; no_target_recall =
        share of absent-class trials answered "no target"; accuracy = share of right answers; iou_present =
        dataset IoU over present-class trials (a "no target" answer predicts nothing) and its per-trial mean;
        exists_recall_by_size: per band of target size (SIZE_BANDS), present trials and the share found."""
        present = np.array([p for p, _ in self.outcomes], dtype=bool)
        said = np.array([e for _, e in self.outcomes], dtype=bool)
        no_target = ~said
        return {"trials": len(self.outcomes), "present": int(present.sum()), "absent": int((~present).sum()),
                "no_target_answers": int(no_target.sum()),
                "no_target_precision": _share(~present[no_target]), "no_target_recall": _share(no_target[~present]),
                "exists_recall": _share(said[present]), "accuracy": _share(said == present),
                "iou_present": self.intersection / self.union if self.union else None,
                "mean_trial_iou_present": float(np.mean(self.trial_ious)) if self.trial_ious else None,
                "exists_recall_by_size": self._by_size()}

    def _by_size(self) -> dict[str, dict[str, Any]]:
        """{band name: {"trials": n, "exists_recall": share}} over the present trials with a size."""
        edges = (0.0, *SIZE_BANDS, 1.0)
        out = {}
        for lo, hi in zip(edges, edges[1:]):
            flags = np.array([e for f, e in self.found if lo <= f < hi or (hi == 1.0 and f == 1.0)], dtype=bool)
            out[f"{lo:g}-{hi:g}"] = {"trials": len(flags), "exists_recall": _share(flags)}
        return out


def mean_iou(predictions: list[np.ndarray], truths: list[np.ndarray], classes: int) -> float:
    """Dataset mIoU of maps holding 1 + class index (0 = unlabelled truth, ignored; 0 in a prediction = no
    class), over the classes present in truth or prediction."""
    confusion = Confusion([str(c) for c in range(classes)])
    for prediction, truth in zip(predictions, truths):
        confusion.add(np.asarray(truth, np.int64) - 1, np.asarray(prediction, np.int64) - 1)
    return confusion.summary()["miou"]


def _mean(values: np.ndarray) -> float | None:
    """Mean of the defined values (None when none is)."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else None


def _share(flags: np.ndarray) -> float | None:
    """Fraction of True (None for no trial)."""
    return float(flags.mean()) if len(flags) else None
