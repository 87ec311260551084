"""Retrieval segmentation: regions of a query image labelled from a reference bank.

Build a `Segmenter` once from an encoder and the bank's three read interfaces (below), then call a mode per
image: `vocabulary` (class names → text → bank labels → visual prototypes), `open_set` (kNN label vote),
`reference` (prototypes pooled from prompted reference images, with a bank-calibrated "no target"), and
`foreground` (binary, kNN fraction of foreground labels, or any `ForegroundScorer`). All similarities are
inner products of L2-normalised vectors (cosines). Every mode returns a `SegmentationResult`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from bank_builder.embed import TEXT_TEMPLATE
from bank_builder.encoders import Encoder
from bank_builder.synthetic import BACKGROUND_CLASSES
from query.regions import Reference, RegionConfig, Regions, check_image, embed_masks, image_regions, prompt_mask
from query.render import Mode, RegionResult, SegmentationResult, assemble_result

__all__ = [
    "BACKGROUND_LABELS", "ForegroundConfig", "ForegroundScorer", "KnnForegroundScorer", "LabelTable", "Mode",
    "OpenSetConfig", "Reference", "ReferenceConfig", "ReferencePrototype", "RegionConfig", "RegionResult", "Regions",
    "Searcher", "SegmentMetadata", "SegmentationResult", "Segmenter", "VocabularyConfig", "knn_votes",
]

_TEXT_CACHE_SIZE = 4096  # class names whose text embedding a Segmenter keeps

# Labels that are scene "stuff" rather than objects (COCO-Stuff style names, plus the synthetic corpus's
# background textures): the foreground mode's default background set.
BACKGROUND_LABELS: frozenset[str] = frozenset({
    "background", "sky", "grass", "gravel", "brick", "wall", "wall-brick", "floor", "ground", "road", "pavement",
    "sand", "snow", "dirt", "water", "sea", "river", "mountain", "hill", "tree", "bush", "ceiling", "fence",
    "field", "rock", "stone", "leaves", "building", *BACKGROUND_CLASSES,
})


# ----------------------------------------------------------------------------------------- bank interfaces


@runtime_checkable
class Searcher(Protocol):
    """kNN over the bank's visual embeddings."""

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, C) float32 L2-normalised → scores (n, k) float32 inner products, best first; ids (n, k) int64, -1 where
        fewer than k were found."""


@runtime_checkable
class SegmentMetadata(Protocol):
    """Metadata lookup by bank segment id."""

    def labels(self, ids: np.ndarray) -> list[str | None]:
        """Label of each segment id (flat int64 array); None for unlabelled segments and for id -1."""


@runtime_checkable
class LabelTable(Protocol):
    """The bank's text index: one row per unique label.

    labels: L unique label strings; text: (L, D) float32 L2-normalised embeddings of TEXT_TEMPLATE.format(label);
    prototypes: (L, C) float32 L2-normalised mean visual embedding of the label's segments; counts: (L,) segments.
    """

    labels: list[str]
    text: np.ndarray
    prototypes: np.ndarray
    counts: np.ndarray


@runtime_checkable
class ForegroundScorer(Protocol):
    """Foreground probability of regions. With RegionConfig(kind="grid") a region is one patch token, so a
    RAG-SEG token-level bank (patch embedding → mask value) implements this directly."""

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, C) float32 L2-normalised region embeddings → (n,) float32 foreground scores in [0, 1]."""


# ----------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class VocabularyConfig:
    """Vocabulary mode: each class takes its `labels_per_class` nearest bank labels by text cosine, weighted by
    softmax(cosine / text_temperature); combine "mean" = one prototype (weighted mean of their visual prototypes),
    "max" = one prototype per label (those with weight ≥ 0.1 × the best), region score = max cosine.
    background_threshold: regions whose best score is below it are background (0); None = every region labelled."""

    labels_per_class: int = 3
    text_temperature: float = 0.01
    combine: Literal["mean", "max"] = "mean"
    background_threshold: float | None = None


@dataclass(frozen=True)
class OpenSetConfig:
    """Open-set mode: each region's `k` nearest bank segments vote with weight softmax(cosine / temperature);
    the region takes the label with the largest share (an unlabelled winner, or share < min_share → background 0)."""

    k: int = 10
    temperature: float = 0.05
    min_share: float = 0.0


@dataclass(frozen=True)
class ReferenceConfig:
    """Reference mode (see `Segmenter.prepare_references` and `Segmenter.reference`): fpr = fraction of bank
    segments of other labels allowed above a prototype's threshold; the reference's own labels are those with a
    kNN vote share (softmax(cosine / temperature)) ≥ positive_share among its `k` nearest segments; at most
    max_calibration_k neighbours are fetched; scribble_width: pixels (None = max(3, min(H, W) // 32))."""

    fpr: float = 0.01
    k: int = 10
    temperature: float = 0.05
    positive_share: float = 0.2
    max_calibration_k: int = 1024  # query.search.MAX_K
    scribble_width: int | None = None


@dataclass(frozen=True)
class ForegroundConfig:
    """Foreground mode: regions with score ≥ threshold are foreground (class "foreground", 1). For the default
    kNN scorer: foreground_labels (None = every label not in background_labels), k and the vote temperature."""

    threshold: float = 0.5
    foreground_labels: frozenset[str] | None = None
    background_labels: frozenset[str] = BACKGROUND_LABELS
    k: int = 10
    temperature: float = 0.05


# ----------------------------------------------------------------------------------------- references


@dataclass(eq=False)
class ReferencePrototype:
    """A reference's pooled embedding (C,) float32, its calibrated cosine threshold, and the bank labels it is
    nearest to (the ones excluded from its negatives)."""

    label: str
    vector: np.ndarray
    threshold: float
    bank_labels: list[str]


# ----------------------------------------------------------------------------------------- kNN votes


def knn_votes(searcher: Searcher, metadata: SegmentMetadata, vectors: np.ndarray, k: int,
              temperature: float) -> tuple[list[str | None], np.ndarray]:
    """(n, C) float32 → (candidate labels U, None = unlabelled; shares (n, U) float32 rows summing to 1, or 0 with
    no neighbour): each of the k nearest segments votes softmax(cosine / temperature) for its label."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be ≥ 1 and temperature > 0, got k={k}, temperature={temperature}")
    scores, ids = searcher.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    valid = ids >= 0
    labels = metadata.labels(ids.ravel())
    candidates = sorted(set(labels) - {None}) + [None]
    column = {label: j for j, label in enumerate(candidates)}
    index = np.array([column[label] for label in labels], dtype=np.int64).reshape(ids.shape)
    logits = np.where(valid, scores.astype(np.float64) / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    weights = np.where(valid, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0.0)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    shares = np.zeros((len(ids), len(candidates)), dtype=np.float64)
    np.add.at(shares, (np.repeat(np.arange(len(ids)), ids.shape[1]), index.ravel()), weights.ravel())
    return candidates, shares.astype(np.float32)


class KnnForegroundScorer:
    """Foreground score = kNN vote share (softmax(cosine / temperature) weights) of neighbours whose label is
    foreground, among labelled neighbours; 0 when none is labelled."""

    def __init__(self, searcher: Searcher, metadata: SegmentMetadata, foreground_labels: frozenset[str] | None = None,
                 background_labels: frozenset[str] = BACKGROUND_LABELS, k: int = 10, temperature: float = 0.05):
        self.searcher, self.metadata, self.k, self.temperature = searcher, metadata, k, temperature
        self.foreground_labels, self.background_labels = foreground_labels, frozenset(background_labels)

    def is_foreground(self, label: str) -> bool:
        """Whether a bank label counts as foreground."""
        if self.foreground_labels is not None:
            return label in self.foreground_labels
        return label not in self.background_labels

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, C) float32 L2-normalised → (n,) float32 in [0, 1]."""
        if not len(embeddings):
            return np.zeros(0, np.float32)
        candidates, shares = knn_votes(self.searcher, self.metadata, embeddings, self.k, self.temperature)
        labelled = shares[:, :-1]  # the last candidate is None
        fg = np.array([self.is_foreground(c) for c in candidates[:-1]], dtype=bool)
        total = labelled.sum(axis=1)
        fraction = labelled[:, fg].sum(axis=1) / np.where(total > 0, total, 1)
        return np.clip(np.where(total > 0, fraction, 0.0), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------- the segmenter


class Segmenter:
    """Retrieval segmentation over one bank: built once (encoder, bank interfaces), queried per image.

    encoder: the bank's encoder (same spec); searcher / metadata / table: the bank's kNN, id → label lookup and
    label table; regions: how query images are cut; foreground: a custom ForegroundScorer (default: kNN vote).
    """

    def __init__(self, encoder: Encoder, searcher: Searcher, metadata: SegmentMetadata, table: LabelTable,
                 regions: RegionConfig = RegionConfig(), foreground: ForegroundScorer | None = None) -> None:
        dim = encoder.spec.visual_dim
        if np.shape(table.prototypes) != (len(table.labels), dim):
            raise ValueError(f"label table prototypes are {np.shape(table.prototypes)}, expected ({len(table.labels)}, "
                             f"{dim}) for encoder {encoder.spec.name!r}; open the bank with the encoder that built it")
        self.encoder, self.searcher, self.metadata, self.table = encoder, searcher, metadata, table
        self.region_config, self.foreground_scorer = regions, foreground
        self._text: dict[str, np.ndarray] = {}  # class name → (D,) float32 text embedding
        self._text_lock = threading.Lock()

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
            return image
        return image_regions(self.encoder, image, self.region_config)

    def text_embeddings(self, names: list[str]) -> np.ndarray:
        """(K, D) float32 L2-normalised embeddings of TEXT_TEMPLATE.format(name), one encoder call per new name
        (as the builder embeds labels, so a class's vector never depends on the other names), cached."""
        vectors = []
        for name in names:
            with self._text_lock:  # requests share a Segmenter: the cache is read and trimmed under one lock
                vector = self._text.get(name)
            if vector is None:
                vector = self.encoder.encode_text([TEXT_TEMPLATE.format(name)])[0]
                with self._text_lock:
                    if len(self._text) >= _TEXT_CACHE_SIZE:
                        self._text.pop(next(iter(self._text)))
                    self._text[name] = vector
            vectors.append(vector)
        return np.stack(vectors).astype(np.float32)

    # ------------------------------------------------------------------------------------- vocabulary

    def class_prototypes(self, classes: Sequence[str], config: VocabularyConfig = VocabularyConfig()
                         ) -> tuple[list[np.ndarray], dict[str, list[tuple[str, float]]]]:
        """Per class an (m, C) float32 L2-normalised prototype array, and {class: [(bank label, weight), ...]}."""
        names = _check_classes(classes)
        if self.encoder.spec.text_dim is None:
            raise ValueError(f"encoder {self.encoder.spec.name!r} has no text tower; use open_set or reference mode")
        if not self.table.labels:
            raise ValueError("the bank has no labelled segments, so vocabulary mode has nothing to match")
        if config.labels_per_class < 1 or config.text_temperature <= 0:
            raise ValueError("labels_per_class must be ≥ 1 and text_temperature > 0")
        sims = self.text_embeddings(names) @ np.asarray(self.table.text, dtype=np.float32).T  # (K, L)
        k = min(config.labels_per_class, len(self.table.labels))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        prototypes, matched = [], {}
        for c, name in enumerate(names):
            logits = sims[c, top[c]].astype(np.float64) / config.text_temperature
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            rows = np.asarray(self.table.prototypes, dtype=np.float32)[top[c]]
            if config.combine == "mean":
                proto = _normalise((weights[:, None] * rows).sum(axis=0, keepdims=True))
            elif config.combine == "max":
                proto = rows[weights >= 0.1 * weights.max()]
            else:
                raise ValueError(f"combine={config.combine!r}: use 'mean' or 'max'")
            prototypes.append(proto.astype(np.float32))
            matched[name] = [(self.table.labels[j], round(float(w), 6)) for j, w in zip(top[c], weights)]
        return prototypes, matched

    def vocabulary(self, image: np.ndarray | Regions, classes: Sequence[str],
                   config: VocabularyConfig = VocabularyConfig()) -> SegmentationResult:
        """Label each region with the class whose prototypes it is most similar to (max cosine)."""
        prototypes, matched = self.class_prototypes(classes, config)
        regions = self.regions(image)
        scores = np.stack([(regions.embeddings @ p.T).max(axis=1) for p in prototypes], axis=1)  # (n, K)
        best = scores.argmax(axis=1)
        score = scores[np.arange(len(best)), best]
        assigned = best + 1
        if config.background_threshold is not None:
            assigned = np.where(score >= config.background_threshold, assigned, 0)
        return self._result("vocabulary", regions, assigned, score, list(matched),
                            details={"prototypes": matched})

    # ------------------------------------------------------------------------------------- open set

    def open_set(self, image: np.ndarray | Regions, config: OpenSetConfig = OpenSetConfig()) -> SegmentationResult:
        """Label each region by the similarity-weighted vote of its k nearest bank segments; score = vote share."""
        regions = self.regions(image)
        candidates, shares = knn_votes(self.searcher, self.metadata, regions.embeddings, config.k, config.temperature)
        best = shares.argmax(axis=1)
        share = shares[np.arange(len(best)), best]
        winners = [candidates[j] for j in best]
        keep = [w is not None and s >= config.min_share for w, s in zip(winners, share)]
        classes = sorted({w for w, ok in zip(winners, keep) if ok})
        assigned = np.array([classes.index(w) + 1 if ok else 0 for w, ok in zip(winners, keep)], dtype=np.int64)
        return self._result("open_set", regions, assigned, share, classes)

    # ------------------------------------------------------------------------------------- reference

    def prepare_references(self, references: Sequence[Reference],
                           config: ReferenceConfig = ReferenceConfig()) -> list[ReferencePrototype]:
        """Pool each reference's prompt region (exactly as the builder pools a segment) and calibrate its threshold.

        Calibration treats the bank as the null distribution: the reference's own labels P are those with a kNN
        vote share ≥ positive_share; the N bank segments labelled outside P are negatives (unlabelled ones are
        ignored); the threshold is the cosine of the ⌈fpr·N⌉-th nearest negative, so a region passes only if it is
        closer to the prototype than all but a fraction fpr of other-label bank segments. With more than
        max_calibration_k neighbours needed, the last fetched cosine is used (stricter). A bank with no other
        label calibrates against all labelled segments.
        """
        if not references:
            raise ValueError("reference mode needs at least one Reference (an image with a mask, box or scribble)")
        if not 0 < config.fpr < 1:
            raise ValueError(f"fpr must lie in (0, 1), got {config.fpr}")
        out = []
        for i, ref in enumerate(references):
            image = check_image(ref.image, f"reference {i} image")
            try:
                mask = prompt_mask(image.shape[:2], ref.mask, ref.box, ref.scribble, config.scribble_width)
            except ValueError as exc:
                raise ValueError(f"reference {i}: {exc}") from None
            vector = embed_masks(self.encoder, image, [mask])[0]
            threshold, positives = self._calibrate(vector, config)
            out.append(ReferencePrototype(str(ref.label), vector, threshold, positives))
        return out

    def _calibrate(self, vector: np.ndarray, config: ReferenceConfig) -> tuple[float, list[str]]:
        """(cosine threshold, the reference's own bank labels) for one prototype; see prepare_references."""
        candidates, shares = knn_votes(self.searcher, self.metadata, vector[None], config.k, config.temperature)
        positives = [c for c, s in zip(candidates, shares[0]) if c is not None and s >= config.positive_share]
        counts = dict(zip(self.table.labels, np.asarray(self.table.counts, dtype=np.int64).tolist()))
        negatives = sum(n for label, n in counts.items() if label not in positives)
        excluded = set(positives) if negatives else set()
        total = negatives or sum(counts.values())
        rank = max(1, math.ceil(config.fpr * total))
        k = min(rank + sum(counts.get(p, 0) for p in excluded) + 64, config.max_calibration_k)
        while True:
            scores, ids = self.searcher.search(vector[None], k)
            labels = self.metadata.labels(ids[0])
            negative = np.array([ok and label is not None and label not in excluded
                                 for ok, label in zip(ids[0] >= 0, labels)], dtype=bool)
            if negative.sum() >= rank:
                return float(scores[0][negative][rank - 1]), positives
            exhausted = (ids[0] < 0).any()
            if exhausted or k >= config.max_calibration_k:
                valid = scores[0][ids[0] >= 0]
                return (float(valid[-1]) if len(valid) else 1.0), positives
            k = min(2 * k, config.max_calibration_k)

    def reference(self, target: np.ndarray | Regions, references: Sequence[Reference | ReferencePrototype],
                  config: ReferenceConfig = ReferenceConfig()) -> SegmentationResult:
        """Find the references' classes in a target image (one-to-many; several classes: many-to-many).

        A region matches a reference when (1) its cosine to the prototype is ≥ the calibrated threshold and
        (2) it is closer to the prototype than to every label prototype of the bank outside the reference's own
        labels (nearest-prototype rule, the reference as one more class). Region score = cosine to the best
        reference − cosine to the nearest such other label (> 0: closer to the reference). A region takes the
        matching class with the highest score, else background; exists = any region matched. Pass
        `prepare_references` output to reuse prototypes (and their calibration) across targets.
        """
        if not references:
            raise ValueError("reference mode needs at least one Reference (an image with a mask, box or scribble)")
        fresh = iter(self.prepare_references([r for r in references if not isinstance(r, ReferencePrototype)], config)
                     if not all(isinstance(r, ReferencePrototype) for r in references) else [])
        prepared = [r if isinstance(r, ReferencePrototype) else next(fresh) for r in references]  # order kept
        classes = list(dict.fromkeys(p.label for p in prepared))
        regions = self.regions(target)
        cosines = regions.embeddings @ np.stack([p.vector for p in prepared]).T  # (n, R)
        to_labels = regions.embeddings @ np.asarray(self.table.prototypes, dtype=np.float32).T  # (n, L)
        relative = np.empty_like(cosines)
        for r, proto in enumerate(prepared):
            others = np.array([label not in proto.bank_labels for label in self.table.labels], dtype=bool)
            nearest_other = to_labels[:, others].max(axis=1) if others.any() else -1.0
            relative[:, r] = cosines[:, r] - nearest_other
        thresholds = np.array([p.threshold for p in prepared], dtype=np.float32)
        key = np.where((cosines >= thresholds) & (relative > 0), relative, -np.inf)
        owner = np.array([classes.index(p.label) for p in prepared])
        class_key = np.stack([key[:, owner == c].max(axis=1) for c in range(len(classes))], axis=1)
        class_relative = np.stack([relative[:, owner == c].max(axis=1) for c in range(len(classes))], axis=1)
        matched = np.isfinite(class_key)
        passed = matched.any(axis=1)
        best = np.where(passed, class_key.argmax(axis=1), class_relative.argmax(axis=1))
        score = np.where(passed[:, None], class_key, class_relative)[np.arange(len(best)), best]
        details = {"exists_by_class": {c: bool(matched[:, j].any()) for j, c in enumerate(classes)},
                   "references": [{"label": p.label, "threshold": p.threshold, "bank_labels": p.bank_labels}
                                  for p in prepared]}
        return self._result("reference", regions, np.where(passed, best + 1, 0), score, classes,
                            exists=bool(passed.any()), details=details)

    # ------------------------------------------------------------------------------------- foreground

    def foreground(self, image: np.ndarray | Regions,
                   config: ForegroundConfig = ForegroundConfig()) -> SegmentationResult:
        """Binary segmentation: class "foreground" (1) where the region's foreground score ≥ threshold."""
        scorer = self.foreground_scorer or KnnForegroundScorer(
            self.searcher, self.metadata, config.foreground_labels, config.background_labels, config.k,
            config.temperature)
        regions = self.regions(image)
        score = np.asarray(scorer.score(regions.embeddings), dtype=np.float32)
        if score.shape != (len(regions),) or not np.all((score >= 0) & (score <= 1)):
            raise ValueError(f"foreground scorer must return ({len(regions)},) scores in [0, 1], got {score.shape}")
        assigned = (score >= config.threshold).astype(np.int64)
        return self._result("foreground", regions, assigned, score, ["foreground"])

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


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)
