"""Per-image predictions of each scored mode on shared regions: dense class scores over the protocol's windows →
a label map at the ground truth's size; the oracle (ground-truth regions) and the region ceiling (each region
its majority true class)."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from bank_builder.records import Segment
from jobs.eval.truth import IGNORED
from query.pamr import softmax
from query.regions import Regions, embed_masks
from query.render import upsample_nearest
from query.segment import ForegroundConfig, OpenSetConfig, Segmenter
from query.votes import Unlabelled, labelled_votes
from query.windows import Box, dense_scores, pixel_scores

Windows = list[tuple[Box, Regions]]


def labels_from_scores(scores: np.ndarray, shape: tuple[int, int], threshold: float | None = None,
                       background: int | None = None, values: np.ndarray | None = None) -> np.ndarray:
    """(H', W', K) per-pixel scores → (H, W) int64 class index at the truth's `shape` (nearest): the best class;
    where its value in `values` ((H', W', K), default the scores) is below `threshold`, `background` (a class
    index) or IGNORED (no class)."""
    best = scores.argmax(axis=2)
    if threshold is not None:
        below = np.take_along_axis(scores if values is None else values, best[:, :, None], axis=2)[:, :, 0] < threshold
        best = np.where(below, IGNORED if background is None else background, best)
    return upsample_nearest(best.astype(np.int64), shape)


def vocabulary_labels(segmenter: Segmenter, windows: Windows, size: tuple[int, int], prototypes: list[np.ndarray],
                      shape: tuple[int, int], threshold: float | None, background: int | None) -> np.ndarray:
    """Vocabulary mode: max cosine to each class's prototypes, averaged over windows; with refinement, the best
    class of the refined softmax(cosine / T) maps, thresholded on its averaged cosine (as Segmenter.vocabulary)."""
    refine = segmenter.region_config.refine

    def cosines(_: Box, regions: Regions) -> np.ndarray:
        return segmenter.vocabulary_scores(regions, prototypes)

    if refine is None:
        return labels_from_scores(dense_scores(windows, size, cosines), shape, threshold, background)
    maps = dense_scores(windows, size, lambda box, regions: softmax(cosines(box, regions), refine.temperature),
                        segmenter.paint)
    values = dense_scores(windows, size, cosines) if threshold is not None else None
    return labels_from_scores(maps, shape, threshold, background, values)


def open_set_labels(segmenter: Segmenter, windows: Windows, size: tuple[int, int], classes: list[str],
                    config: OpenSetConfig, shape: tuple[int, int], match: Mapping[str, str] | None = None
                    ) -> np.ndarray:
    """Open-set mode: kNN vote shares folded onto the class list by `match` (`fold_shares`; + one column for
    unlabelled neighbours and unmatched labels, which predicts no class), averaged over windows."""
    scores = dense_scores(windows, size, lambda _, regions: fold_shares(
        *segmenter.open_set_shares(regions, config), classes, match, config.unlabelled), segmenter.paint)
    labels = labels_from_scores(scores, shape)
    return np.where(labels == len(classes), IGNORED, labels)


def fold_shares(candidates: list[str | None], shares: np.ndarray, classes: list[str],
                match: Mapping[str, str] | None = None, unlabelled: Unlabelled = "ignore") -> np.ndarray:
    """(n, U) vote shares over candidate labels → (n, K + 1) over the class list, the last column the rest. A bank
    label counts for the class `match` maps it to ({bank label: class}, `query.prototypes.class_labels`); None:
    only a label equal to a class name counts, for that class. Unlabelled votes count for the rest under
    "vote"; under "ignore" (as OpenSetConfig.unlabelled, `labelled_votes`) for nothing, and a row without a
    labelled vote is the rest's."""
    index = {name: i for i, name in enumerate(classes)}
    out = np.zeros((len(shares), len(classes) + 1), np.float32)
    columns = [index.get(label if match is None else match.get(label), len(classes)) if label is not None
               else len(classes) for label in candidates]
    np.add.at(out, (slice(None), columns), labelled_votes(candidates, shares, unlabelled))
    return out


def foreground_map(segmenter: Segmenter, windows: Windows, size: tuple[int, int], config: ForegroundConfig,
                   shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 foreground score at the truth's shape (nearest), averaged over windows."""
    scores = dense_scores(windows, size, lambda _, regions: segmenter.foreground_scores(regions, config)[:, None],
                          segmenter.paint)
    return upsample_nearest(scores[:, :, 0], shape)


def truth_regions(image: np.ndarray, segments: list[Segment], classes: list[str],
                  embed: Callable[[np.ndarray, list[np.ndarray]], np.ndarray]) -> tuple[Regions, list[int]] | None:
    """The ground-truth segments labelled with a scored class as Regions (pooled by `embed(image, masks)`), and
    the class of each; None without any. Pixels outside them join region 0 (they are not scored)."""
    kept = [(s.mask, classes.index(s.label)) for s in segments if s.label in classes]
    if not kept:
        return None
    masks = np.stack([m for m, _ in kept])
    labels = np.where(masks.any(axis=0), masks.argmax(axis=0), 0).astype(np.int64)
    return Regions(masks=masks, embeddings=embed(image, list(masks)), labels=labels), [c for _, c in kept]


def oracle_labels(region_scores: np.ndarray, regions: Regions, shape: tuple[int, int],
                  others: int | None = None) -> np.ndarray:
    """(H, W) class index: each ground-truth region its best-scoring class ((n, K) scores; column `others`, when
    given, predicts no class)."""
    best = region_scores.argmax(axis=1)
    if others is not None:
        best = np.where(best == others, IGNORED, best)
    return pixel_scores(regions, best[:, None].astype(np.float32), shape)[:, :, 0].astype(np.int64)


def ceiling_labels(windows: Windows, size: tuple[int, int], truth: np.ndarray, classes: int) -> np.ndarray:
    """(H, W) class index when every region of every window takes its majority true class (ignored pixels do not
    vote; a region with none votes for nothing): the best any labelling of these regions can score."""
    scaled = upsample_nearest(truth, size)

    def majority(box: Box, regions: Regions) -> np.ndarray:
        y0, x0, y1, x1 = box
        region = upsample_nearest(regions.label_map(), (y1 - y0, x1 - x0))
        window = scaled[y0:y1, x0:x1]
        votes = np.zeros((len(regions), classes + 1), np.float32)
        np.add.at(votes, (region.ravel(), np.where(window < 0, classes, window).ravel()), 1)
        votes[:, classes] = 0
        out = np.zeros_like(votes)
        out[np.arange(len(votes)), votes.argmax(axis=1)] = votes.max(axis=1) > 0
        out[:, classes] = votes.max(axis=1) == 0
        return out

    labels = labels_from_scores(dense_scores(windows, size, majority), truth.shape)
    return np.where(labels == classes, IGNORED, labels)


def embedder(segmenter: Segmenter) -> Callable[[np.ndarray, list[np.ndarray]], np.ndarray]:
    """Masks of an image → (n, C) embeddings pooled by the builder's path with the segmenter's encoder."""
    return lambda image, masks: embed_masks(segmenter.encoder, image, masks)
