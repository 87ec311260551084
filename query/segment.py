"""Retrieval segmentation: regions of a query image labelled from a reference bank.

Build a `Segmenter` once from an encoder and the bank's three read interfaces (below), then call a mode per
image: `vocabulary` (class names → text → bank labels → visual prototypes), `open_set` (kNN label vote),
`reference` (prototypes pooled from prompted reference images and their own bank labels, with an image-level
"no target" decision: query.reference), and `foreground` (binary, kNN fraction of foreground labels, or any
`ForegroundScorer`). All similarities are inner products of L2-normalised vectors (cosines). Every mode returns a
`SegmentationResult`. With a region configuration that refines (RegionConfig.refine), the vocabulary, open-set
and foreground modes label pixels: region scores painted on pixels are refined over the image's colours
(query.pamr) and each region is split into pieces of one label (`Segmenter.paint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from bank_builder.encoders import Encoder
from query.class_text import ClassText
from query.interfaces import (
    BACKGROUND_LABELS, ForegroundScorer, LabelTable, Searcher, SegmentMetadata, SegmentVectors,
)
from query.prototypes import BankAccess, VocabularyConfig, class_prototypes
from query.reference import (
    REFERENCE_DECISIONS, ReferenceConfig, ReferencePrototype, class_separation, decide, make_prototype, mean_shot,
)
from query.pamr import refine_maps, softmax
from query.regions import (
    Reference, RegionConfig, Regions, check_image, embed_masks, image_regions, prompt_mask, split_regions,
)
from query.render import Mode, RegionResult, SegmentationResult, assemble_result, upsample_nearest
from query.votes import KnnForegroundScorer, Unlabelled, check_unlabelled, knn_votes, labelled_votes
from query.windows import pixel_scores

__all__ = [
    "BACKGROUND_LABELS", "ForegroundConfig", "ForegroundScorer", "KnnForegroundScorer", "LabelTable", "Mode",
    "OpenSetConfig", "REFERENCE_DECISIONS", "Reference", "ReferenceConfig", "ReferencePrototype", "RegionConfig",
    "RegionResult", "Regions", "Searcher", "SegmentMetadata", "SegmentVectors", "SegmentationResult", "Segmenter",
    "VocabularyConfig", "knn_votes",
]

# ----------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class OpenSetConfig:
    """Open-set mode: each region's `k` nearest bank segments vote with weight softmax(cosine / temperature);
    the region takes the label with the largest share (share < min_share, or no vote → background 0).
    unlabelled: "ignore" (default) leaves unlabelled neighbours (unpaired segments of a caption-paired bank) out
    of the winner, so a region takes the best label among its labelled neighbours and its score stays that
    label's share of all votes; "vote" lets them win, and a region they win is background."""

    k: int = 10
    temperature: float = 0.05
    min_share: float = 0.0
    unlabelled: Unlabelled = "ignore"

    def __post_init__(self) -> None:
        check_unlabelled(self.unlabelled, "OpenSetConfig.unlabelled")


@dataclass(frozen=True)
class ForegroundConfig:
    """Foreground mode: regions with score ≥ threshold are foreground (class "foreground", 1). For the default
    kNN scorer: foreground_labels (None = every label not in background_labels), k and the vote temperature."""

    threshold: float = 0.5
    foreground_labels: frozenset[str] | None = None
    background_labels: frozenset[str] = BACKGROUND_LABELS
    k: int = 10
    temperature: float = 0.05


# ----------------------------------------------------------------------------------------- the segmenter


class Segmenter:
    """Retrieval segmentation over one bank: built once (encoder, bank interfaces), queried per image.

    encoder: the bank's encoder (same spec); searcher / metadata / table: the bank's kNN, id → label lookup and
    label table; regions: how query images are cut; foreground: a custom ForegroundScorer (default: kNN vote);
    vectors: the bank's stored vectors by id (only VocabularyConfig.prototypes_per_class > 1 reads them);
    class_text: class-name embeddings to share with other Segmenters of the same encoder (default: its own).
    Regions with hierarchy levels (RegionConfig.merge_thresholds) are scored, in the vocabulary, open-set and
    foreground modes, by the mean of their scores over the levels (query.hierarchy).
    """

    def __init__(self, encoder: Encoder, searcher: Searcher, metadata: SegmentMetadata, table: LabelTable,
                 regions: RegionConfig = RegionConfig(), foreground: ForegroundScorer | None = None,
                 vectors: SegmentVectors | None = None, class_text: ClassText | None = None) -> None:
        dim = encoder.spec.visual_dim
        if np.shape(table.prototypes) != (len(table.labels), dim):
            raise ValueError(f"label table prototypes are {np.shape(table.prototypes)}, expected ({len(table.labels)}, "
                             f"{dim}) for encoder {encoder.spec.name!r}; open the bank with the encoder that built it")
        self.encoder, self.searcher, self.metadata, self.table = encoder, searcher, metadata, table
        self.region_config, self.foreground_scorer, self.vectors = regions, foreground, vectors
        if class_text is not None and class_text.encoder is not encoder:
            raise ValueError("class_text embeds with another encoder than this Segmenter's")
        self.class_text = class_text or ClassText(encoder)

    def regions(self, image: np.ndarray | Regions) -> Regions:
        """Regions of an (H, W, 3) uint8 image with embeddings pooled exactly as the builder pools segments;
        a Regions passes through, so one image's regions can serve several modes."""
        if isinstance(image, Regions):
            if image.embeddings.shape != (len(image.masks), self.encoder.spec.visual_dim) or image.masks.ndim != 3:
                raise ValueError(f"regions must be (n, H, W) masks with (n, {self.encoder.spec.visual_dim}) embeddings")
            if image.labels is not None and np.shape(image.labels) != image.masks.shape[1:]:
                raise ValueError(f"regions labels must be an (h, w) map like the masks {image.masks.shape[1:]}, "
                                 f"got {np.shape(image.labels)}")
            if image.size is not None and not all(s >= m for s, m in zip(image.size, image.masks.shape[1:])):
                raise ValueError(f"regions size {image.size} must be at least the masks' {image.masks.shape[1:]}")
            for level in image.levels:
                if np.shape(level.group) != (len(image),) or len(level.embeddings) <= np.max(level.group, initial=-1):
                    raise ValueError(f"a regions level must map each of the {len(image)} regions to one of its rows")
            return image
        return image_regions(self.encoder, image, self.region_config)

    def text_embeddings(self, names: list[str]) -> np.ndarray:
        """(K, D) float32 L2-normalised embeddings of TEXT_TEMPLATE.format(name) (`query.class_text`)."""
        return self.class_text(names)

    # ------------------------------------------------------------------------------------- vocabulary

    def class_prototypes(self, classes: Sequence[str], config: VocabularyConfig = VocabularyConfig()
                         ) -> tuple[list[np.ndarray], dict[str, list[tuple[str, float]]]]:
        """Per class an (m, C) float32 L2-normalised prototype array, and {class: [(bank label, weight), ...]}."""
        names = _check_classes(classes)
        if self.encoder.spec.text_dim is None:
            raise ValueError(f"encoder {self.encoder.spec.name!r} has no text tower; use open_set or reference mode")
        if not self.table.labels:
            raise ValueError("the bank has no labelled segments, so vocabulary mode has nothing to match")
        return class_prototypes(self.table, self.text_embeddings(names), names, config,
                                BankAccess(self.searcher, self.metadata, self.vectors))

    def vocabulary(self, image: np.ndarray | Regions, classes: Sequence[str],
                   config: VocabularyConfig = VocabularyConfig()) -> SegmentationResult:
        """Label each region with the class whose prototypes it is most similar to (max cosine)."""
        prototypes, matched = self.class_prototypes(classes, config)
        regions = self.regions(image)
        scores = self.vocabulary_scores(regions, prototypes)
        refine = self.region_config.refine
        regions, best, score = self._labelled(regions, scores, 
                                               None if refine is None else softmax(scores, refine.temperature))
        assigned = best + 1
        if config.background_threshold is not None:
            assigned = np.where(score >= config.background_threshold, assigned, 0)
        return self._result("vocabulary", regions, assigned, score, list(matched),
                            details={"prototypes": matched})

    def vocabulary_scores(self, regions: Regions, prototypes: list[np.ndarray]) -> np.ndarray:
        """(n, K) float32: each region's max cosine to each class's (m, C) prototypes (`class_prototypes`)."""
        return self._level_mean(regions, lambda e: np.stack([(e @ p.T).max(axis=1) for p in prototypes], axis=1))

    def _labelled(self, regions: Regions, scores: np.ndarray, maps: np.ndarray | None = None
                  ) -> tuple[Regions, np.ndarray, np.ndarray]:
        """(regions, (m,) best column, (m,) its score) of (n, K) region scores: each region's best column; with
        refinement, each pixel's best column of the refined `maps` ((n, K) per region, default the scores), the
        regions split into pieces of one column, each scored by its region's score for that column."""
        if self.region_config.refine is None:
            best = scores.argmax(axis=1)
            return regions, best, scores[np.arange(len(best)), best]
        pixels = self.paint(regions, scores if maps is None else maps).argmax(axis=2)
        pieces, source, best = split_regions(regions, pixels)
        return pieces, best, scores[source, best]

    def paint(self, regions: Regions, scores: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W, K) float32 per-pixel maps of (n, K) region scores: each pixel its region's row, with refinement
        (RegionConfig.refine) refined over the regions' pixels at their working size; upsampled nearest to `size`
        (default: the masks' size)."""
        shape = regions.masks.shape[1:]
        maps = pixel_scores(regions, scores, shape)
        refine = self.region_config.refine
        if refine is not None:
            if regions.image is None or regions.image.shape[:2] != shape:
                raise ValueError("these regions carry no pixels to refine over; make them with this Segmenter's "
                                 "regions() (its RegionConfig.refine keeps the working image)")
            maps = refine_maps(maps, regions.image, refine)
        return upsample_nearest(maps, size) if size is not None else maps

    def _level_mean(self, regions: Regions, score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """score((m, C) embeddings) → (m, ...) per region; with hierarchy levels, each region gets the mean over the
        levels of the score of the level region holding it."""
        if not regions.levels:
            return score(regions.embeddings)
        return np.mean([score(level.embeddings)[level.group] for level in regions.levels], axis=0)

    # ------------------------------------------------------------------------------------- open set

    def open_set(self, image: np.ndarray | Regions, config: OpenSetConfig = OpenSetConfig()) -> SegmentationResult:
        """Label each region by the similarity-weighted vote of its k nearest bank segments; score = vote share."""
        regions = self.regions(image)
        candidates, shares = self.open_set_shares(regions, config)
        regions, best, share = self._labelled(regions, labelled_votes(candidates, shares, config.unlabelled))
        winners = [candidates[j] for j in best]
        keep = [w is not None and s >= config.min_share for w, s in zip(winners, share)]
        classes = sorted({w for w, ok in zip(winners, keep) if ok})
        assigned = np.array([classes.index(w) + 1 if ok else 0 for w, ok in zip(winners, keep)], dtype=np.int64)
        return self._result("open_set", regions, assigned, share, classes)

    def open_set_shares(self, regions: Regions, config: OpenSetConfig = OpenSetConfig()
                        ) -> tuple[list[str | None], np.ndarray]:
        """(candidate labels U, last = None for unlabelled; (n, U) float32 vote shares) of the regions' kNN votes
        (`knn_votes`); with hierarchy levels, the mean over the levels of the votes of the level region."""
        levels = regions.levels
        groups = [level.group for level in levels] or [np.arange(len(regions))]
        runs = [knn_votes(self.searcher, self.metadata, e, config.k, config.temperature)
                for e in ([level.embeddings for level in levels] or [regions.embeddings])]
        candidates = sorted({c for labels, _ in runs for c in labels} - {None}) + [None]
        column = {label: j for j, label in enumerate(candidates)}
        total = np.zeros((len(regions), len(candidates)), np.float64)
        for (labels, shares), group in zip(runs, groups):
            total[:, [column[label] for label in labels]] += shares[group]
        return candidates, (total / len(runs)).astype(np.float32)

    # ------------------------------------------------------------------------------------- reference

    def prepare_references(self, references: Sequence[Reference],
                           config: ReferenceConfig = ReferenceConfig()) -> list[ReferencePrototype]:
        """Pool each reference's prompt region (exactly as the builder pools a segment) and make the prototypes.

        With `pool_shots` (default) references sharing a label make one prototype, the normalised mean of their
        embeddings (one class asked once, not once per shot), in the order their labels first appear; else one
        prototype per reference. The reference's own labels P are those with a kNN vote share ≥ positive_share;
        with `recruit` > 0 the prototype is pulled toward P's bank label prototypes (query.reference.recruit).
        Calibration treats the bank as the null distribution: the threshold is the cosine of the ⌈fpr·N⌉-th
        nearest of the N bank segments labelled outside P (query.reference.calibrate); the "calibrated" decision
        uses it.
        """
        if not references:
            raise ValueError("reference mode needs at least one Reference (an image with a mask, box or scribble)")
        pooled: dict[str, list[tuple[str, np.ndarray]]] = {}  # class (or reference) → shots
        for i, ref in enumerate(references):
            image = check_image(ref.image, f"reference {i} image")
            try:
                mask = prompt_mask(image.shape[:2], ref.mask, ref.box, ref.scribble, config.scribble_width)
            except ValueError as exc:
                raise ValueError(f"reference {i}: {exc}") from None
            vector = embed_masks(self.encoder, image, [mask])[0]
            pooled.setdefault(str(ref.label) if config.pool_shots else str(i), []).append((str(ref.label), vector))
        return [make_prototype(shots[0][0], mean_shot([v for _, v in shots]), self.searcher, self.metadata,
                               self.table, config) for shots in pooled.values()]

    def reference(self, target: np.ndarray | Regions, references: Sequence[Reference | ReferencePrototype],
                  config: ReferenceConfig = ReferenceConfig()) -> SegmentationResult:
        """Find the references' classes in a target image (one-to-many; several classes: many-to-many).

        A region's relative score for a prototype = its cosine to the prototype − its cosine to the nearest label
        prototype of the bank outside the reference's own labels (> 0: closer to the reference than to any other
        bank class); with hierarchy levels, cosines are the means over the levels. Whether a class exists is an
        image-level decision (ReferenceConfig.decision, query.reference.decide): by default its best region's
        relative score ≥ margin (in units of the bank's class separation). In a class that exists, the regions
        with relative score > 0 match it; a region takes the matching class with the highest score, else
        background; exists = any class found. Pass
        `prepare_references` output to reuse prototypes (and their calibration) across targets.
        """
        if not references:
            raise ValueError("reference mode needs at least one Reference (an image with a mask, box or scribble)")
        fresh = [r for r in references if not isinstance(r, ReferencePrototype)]
        prepared = [r for r in references if isinstance(r, ReferencePrototype)]
        prepared += self.prepare_references(fresh, config) if fresh else []
        order = list(dict.fromkeys(str(r.label) for r in references))
        prepared.sort(key=lambda p: order.index(p.label))  # classes in the order given
        regions = self.regions(target)
        vectors = np.stack([p.vector for p in prepared])
        others = [np.array([label not in p.bank_labels for label in self.table.labels], dtype=bool) for p in prepared]
        label_prototypes = np.asarray(self.table.prototypes, dtype=np.float32)

        def cosines_and_relative(embeddings: np.ndarray) -> np.ndarray:
            cosines = embeddings @ vectors.T  # (m, R)
            to_labels = embeddings @ label_prototypes.T  # (m, L)
            nearest = np.stack([to_labels[:, o].max(axis=1) if o.any() else np.full(len(embeddings), -1.0)
                                for o in others], axis=1)
            return np.stack([cosines, cosines - nearest], axis=1)  # (m, 2, R)

        cosines, relative = self._level_mean(regions, cosines_and_relative).transpose(1, 0, 2)
        separation = class_separation(self.table)
        decision = decide(cosines, relative, prepared, config, separation)
        details = {"exists_by_class": decision.exists_by_class, "decision": config.decision,
                   "best_relative": decision.best_relative, "margin": config.margin * separation,
                   "references": [{"label": p.label, "threshold": p.threshold, "bank_labels": p.bank_labels}
                                  for p in prepared]}
        return self._result("reference", regions, decision.assigned, decision.scores, list(decision.exists_by_class),
                            exists=any(decision.exists_by_class.values()), details=details)

    # ------------------------------------------------------------------------------------- foreground

    def foreground(self, image: np.ndarray | Regions,
                   config: ForegroundConfig = ForegroundConfig()) -> SegmentationResult:
        """Binary segmentation: class "foreground" (1) where the region's foreground score ≥ threshold."""
        regions = self.regions(image)
        score = self.foreground_scores(regions, config)
        if self.region_config.refine is not None:  # pieces of one side of the threshold, scored by their mean
            refined = self.paint(regions, score[:, None])[:, :, 0]
            regions, _, _ = split_regions(regions, (refined >= config.threshold).astype(np.int64))
            score = (np.bincount(regions.labels.ravel(), refined.ravel()) / np.bincount(regions.labels.ravel())
                     ).astype(np.float32)
        assigned = (score >= config.threshold).astype(np.int64)
        return self._result("foreground", regions, assigned, score, ["foreground"])

    def foreground_scores(self, regions: Regions, config: ForegroundConfig = ForegroundConfig()) -> np.ndarray:
        """(n,) float32 foreground scores in [0, 1] of the regions (the Segmenter's scorer, else the kNN vote)."""
        scorer = self.foreground_scorer or KnnForegroundScorer(
            self.searcher, self.metadata, config.foreground_labels, config.background_labels, config.k,
            config.temperature)

        def score(embeddings: np.ndarray) -> np.ndarray:
            values = np.asarray(scorer.score(embeddings), dtype=np.float32)
            if values.shape != (len(embeddings),) or not np.all((values >= 0) & (values <= 1)):
                raise ValueError(f"foreground scorer must return ({len(embeddings)},) scores in [0, 1], "
                                 f"got {values.shape}")
            return values

        return self._level_mean(regions, score).astype(np.float32)

    def _result(self, mode: Mode, regions: Regions, assigned: np.ndarray, scores: np.ndarray, classes: list[str],
                **extra) -> SegmentationResult:
        return assemble_result(mode, regions.masks, assigned, scores, classes, self.encoder.spec,
                               labels=regions.labels, size=regions.size, **extra)


def _check_classes(classes: Sequence[str]) -> list[str]:
    """Class names stripped, checked non-empty and unique."""
    if isinstance(classes, str):
        raise ValueError("classes must be a list of class names, not one string; e.g. ['cat', 'grass']")
    names = [str(c).strip() for c in classes]
    if not names or not all(names):
        raise ValueError("vocabulary mode needs a non-empty list of non-blank class names, e.g. ['cat', 'grass']")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return names

