"""Reference mode's "no target" decision (query.reference) on a small exact bank of known vectors: own labels and
recruitment, the calibrated threshold, the class separation that scales the margin, the margin and calibrated
decisions against brute force, shots pooled into one prototype, and the options' checks. The decision's quality
on the stand-in encoder is measured by tests/test_eval.py and docs/QUALITY.md ("Reference mode")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bank_builder.config import EncoderConfig
from bank_builder.encoders import load_encoder
from jobs.eval import ReferenceTrials
from query.reference import (
    ReferenceConfig, ReferencePrototype, calibrate, class_separation, decide, make_prototype, mean_shot, recruit,
)
from query.regions import Reference, embed_masks
from query.segment import Segmenter


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class VectorBank:
    """Searcher + SegmentMetadata + LabelTable over given vectors and labels, by brute force."""

    def __init__(self, vectors: np.ndarray, labels: list[str | None]) -> None:
        self.vectors, self.row_labels = unit(vectors), labels
        self.labels = sorted({label for label in labels if label is not None})
        rows = {label: [i for i, lab in enumerate(labels) if lab == label] for label in self.labels}
        self.prototypes = unit(np.stack([self.vectors[rows[label]].mean(axis=0) for label in self.labels]))
        self.text = self.prototypes.copy()
        self.counts = np.array([len(rows[label]) for label in self.labels])

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = vectors @ self.vectors.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        pad = k - order.shape[1]
        return (np.pad(np.take_along_axis(sims, order, axis=1), ((0, 0), (0, pad)), constant_values=-np.inf),
                np.pad(order, ((0, 0), (0, pad)), constant_values=-1))

    def labels_of(self, ids: np.ndarray) -> list[str | None]:
        return [self.row_labels[i] if i >= 0 else None for i in np.asarray(ids).ravel()]


class Metadata:
    def __init__(self, bank: VectorBank) -> None:
        self.labels = bank.labels_of


def clustered_bank(dim: int = 16, per_class: int = 12, seed: int = 0) -> tuple[VectorBank, np.ndarray]:
    """Classes a, b, c around three orthogonal directions (noise 0.3), plus 5 unlabelled segments; the centres."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:3]
    vectors = [centres[c] + 0.3 * rng.standard_normal(dim) / math.sqrt(dim) for c in range(3) for _ in range(per_class)]
    vectors += list(rng.standard_normal((5, dim)))
    labels = [name for name in "abc" for _ in range(per_class)] + [None] * 5
    return VectorBank(np.stack(vectors), labels), centres


def test_own_labels_recruit_and_calibration_by_brute_force():
    bank, centres = clustered_bank()
    meta = Metadata(bank)
    query = unit(centres[0] + 0.4 * centres[1])  # an "a" seen partly mixed with "b"
    alone = make_prototype("x", query, bank, meta, bank, ReferenceConfig(recruit=0.0))
    assert alone.bank_labels == ["a"] and np.array_equal(alone.vector, query)
    pulled = make_prototype("x", query, bank, meta, bank, ReferenceConfig(recruit=0.5))
    expected = unit(0.5 * query + 0.5 * bank.prototypes[0])
    np.testing.assert_allclose(pulled.vector, expected, atol=1e-6)
    assert pulled.vector @ bank.prototypes[0] > query @ bank.prototypes[0]  # closer to what the bank knows of "a"
    # the threshold is calibrated for the final vector: the ⌈fpr·N⌉-th nearest segment labelled b or c
    sims = bank.vectors @ pulled.vector
    negatives = np.sort(sims[[label in ("b", "c") for label in bank.row_labels]])[::-1]
    fpr = ReferenceConfig().fpr
    assert pulled.threshold == pytest.approx(negatives[math.ceil(fpr * len(negatives)) - 1], abs=1e-6)
    config = ReferenceConfig(fpr=0.05)
    assert calibrate(pulled.vector, ["a"], bank, meta, bank, config) == pytest.approx(
        negatives[math.ceil(0.05 * len(negatives)) - 1], abs=1e-6)
    # no own label (a reference far from every labelled segment): nothing to recruit
    assert np.array_equal(recruit(query, [], bank, 0.5), query)


def test_class_separation_is_one_minus_the_mean_pairwise_cosine():
    bank, _ = clustered_bank()
    gram = bank.prototypes.astype(np.float64) @ bank.prototypes.T.astype(np.float64)
    mean = gram[~np.eye(len(gram), dtype=bool)].mean()
    assert class_separation(bank) == pytest.approx(1 - mean, abs=1e-6)
    single = VectorBank(np.ones((3, 4)), ["a"] * 3)
    assert class_separation(single) == 1.0


def brute_force(cos: np.ndarray, rel: np.ndarray, thresholds: np.ndarray, config: ReferenceConfig,
                separation: float) -> tuple[np.ndarray, bool]:
    """One prototype: the regions labelled 1 and whether the class exists, from the documented rules."""
    if config.decision == "calibrated":
        match = (rel > 0) & (cos >= thresholds[0])
        return match.astype(int), bool(match.any())
    found = rel.max() >= config.margin * separation
    match = ((rel > 0) | (rel >= config.margin * separation)) & found
    return match.astype(int), bool(found)


@pytest.mark.parametrize("decision", ["margin", "calibrated"])
def test_decision_against_brute_force(decision):
    rng = np.random.default_rng(1)
    prototype = [ReferencePrototype("x", np.zeros(4, np.float32), 0.6, ["a"])]
    outcomes = set()
    for trial in range(200):
        cos = rng.uniform(0.2, 0.9, (7, 1)).astype(np.float32)
        rel = rng.uniform(-0.3, 0.2, (7, 1)).astype(np.float32)
        margin = float(rng.choice([0.1, 0.0, -0.05]))
        separation = float(rng.uniform(0.3, 1.0))
        config = ReferenceConfig(decision=decision, margin=margin)
        result = decide(cos, rel, prototype, config, separation)
        labels, exists = brute_force(cos[:, 0], rel[:, 0], np.array([0.6]), config, separation)
        np.testing.assert_array_equal(result.assigned, labels)
        assert result.exists_by_class == {"x": exists} and (labels.any() == exists)  # exists ⇔ a region labelled
        assert result.best_relative["x"] == pytest.approx(float(rel.max()))
        np.testing.assert_allclose(result.scores, rel[:, 0])  # one class: every region's score is its relative
        outcomes.add(exists)
    assert outcomes == {True, False}


def test_margin_decides_where_the_calibrated_threshold_misses():
    """A small target: its best region is clearly nearer the reference than any other label, but its cosine is
    below the calibrated threshold (a partial view of the object). The margin rule finds it, the calibrated rule
    answers "no target"; a region only slightly nearer the reference (relative < margin) is "no target" for the
    margin rule."""
    prototype = [ReferencePrototype("x", np.zeros(4, np.float32), 0.8, ["a"])]
    cos = np.array([[0.55], [0.30], [0.20]], np.float32)
    rel = np.array([[0.25], [-0.10], [-0.30]], np.float32)
    assert decide(cos, rel, prototype, ReferenceConfig()).exists_by_class == {"x": True}
    assert decide(cos, rel, prototype, ReferenceConfig(decision="calibrated")).exists_by_class == {"x": False}
    weak = np.array([[0.05], [-0.10], [-0.30]], np.float32)
    assert decide(cos, weak, prototype, ReferenceConfig()).exists_by_class == {"x": False}
    # two classes: a region takes the class it is most relatively similar to; a class not found labels nothing
    two = prototype + [ReferencePrototype("y", np.zeros(4, np.float32), 0.8, ["b"])]
    result = decide(np.hstack([cos, cos]), np.array([[0.25, 0.3], [0.2, 0.02], [-0.3, -0.2]], np.float32), two,
                    ReferenceConfig())
    assert result.assigned.tolist() == [2, 1, 0] and result.exists_by_class == {"x": True, "y": True}


def test_shots_of_a_class_pool_into_one_prototype():
    """Two references labelled alike make one prototype, the normalised mean of their embeddings (pool_shots), or
    one each; the class is asked once either way, and the classes keep the order given."""
    encoder = load_encoder(EncoderConfig(name="tiny-clip", weights="untrained", seed=0))
    rng = np.random.default_rng(2)
    dim = encoder.spec.visual_dim
    bank = VectorBank(rng.standard_normal((30, dim)), [name for name in "abc" for _ in range(10)])
    segmenter = Segmenter(encoder, bank, Metadata(bank), bank)
    image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    masks = [np.zeros((48, 48), bool) for _ in range(3)]
    masks[0][:20, :20], masks[1][20:, 20:], masks[2][:, 30:] = True, True, True
    refs = [Reference(image, mask=masks[0], label="x"), Reference(image, mask=masks[1], label="x"),
            Reference(image, mask=masks[2], label="y")]
    pooled = segmenter.prepare_references(refs, ReferenceConfig(recruit=0.0))
    each = segmenter.prepare_references(refs, ReferenceConfig(recruit=0.0, pool_shots=False))
    vectors = embed_masks(encoder, image, masks)
    assert [p.label for p in pooled] == ["x", "y"] and [p.label for p in each] == ["x", "x", "y"]
    np.testing.assert_allclose(pooled[0].vector, mean_shot([vectors[0], vectors[1]]), atol=1e-6)
    np.testing.assert_allclose(pooled[0].vector, unit(vectors[0] + vectors[1]), atol=1e-3)
    target = segmenter.regions(image)
    for prepared in (pooled, each):
        result = segmenter.reference(target, [*reversed(prepared)])
        assert result.classes == ["y", "x"] and set(result.details["best_relative"]) == {"x", "y"}


def test_options_are_checked_with_the_fix():
    for bad, word in (({"decision": "vote"}, "margin, calibrated"), ({"recruit": 1.0}, "[0, 1)"),
                      ({"margin": 5.0}, "[-2, 2]"), ({"fpr": 0.0}, "(0, 1)")):
        with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            ReferenceConfig(**bad)
    with pytest.raises(ValueError, match="margin, calibrated"):
        ReferenceTrials(decision="vote")
    assert ReferenceTrials(margin=0.2, recruit=0.0, pool_shots=False).query(7) == ReferenceConfig(
        k=7, margin=0.2, recruit=0.0, pool_shots=False)
