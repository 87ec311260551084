"""`refbank eval` on a real bank built with the shipped stand-in encoder (synthetic-clip) from a generated corpus:
the measured targets (with margin), the metrics against brute force, the sliding window against the whole-image
run, P prototypes per class, the region hierarchy, convert → eval on an ADE20K-layout fixture, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bank_builder.config import BuildConfig, EncoderConfig, IngestConfig, PipelineConfig
from bank_builder.convert import ConvertConfig, convert
from bank_builder.datasets import ADE20K_CLASSES
from bank_builder.encoders.fit import SHIPPED_CHECKPOINT
from bank_builder.index import IndexConfig, build_index
from bank_builder.ingest import iter_samples
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, class_names, make_corpus
from jobs.cli import app
from jobs.eval import (
    IGNORED, BinaryScores, Confusion, EvalConfig, Protocol, ReferenceScores, Variant, evaluate, mean_iou,
    parse_ablations,
)
from jobs.eval.run import _Run
from jobs.eval.scoring import foreground_map, open_set_labels, vocabulary_labels
from query.hierarchy import adjacent_pairs, merge_levels
from query.prototypes import VocabularyConfig, spherical_kmeans
from query.regions import embed_masks, region_preset
from query.segment import ForegroundConfig, OpenSetConfig
from query.windows import WindowConfig, resize_short_side, window_boxes, window_regions
from tests.test_convert import blocks, jpeg, png

NAMES = list(class_names())
STANDIN = EncoderConfig(name="synthetic-clip", weights=str(SHIPPED_CHECKPOINT), device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """A synthetic-clip bank of 3 × 16 generated 112 px images (seed 61), indexed; 32 held-out images."""
    root = tmp_path_factory.mktemp("eval")
    make_corpus(str(root / "corpus"), CorpusConfig(shards=3, samples_per_shard=16, image_size=112,
                                                   heldout_shards=2, seed=61))
    bank = str(root / "bank")
    build = BuildConfig(source=str(root / "corpus" / "train-*.tar"), bank=bank, encoder=STANDIN,
                        pipeline=PipelineConfig(batch_size=8, progress_interval_s=0.0))
    assert build_bank(build).ok
    build_index(bank, IndexConfig(autotune_queries=50, nprobe_candidates=(1, 4, 16)))
    return {"root": root, "bank": bank, "heldout": str(root / "corpus" / "heldout-*.tar")}


@pytest.fixture(scope="module")
def report(world):
    """One run: every mode, the oracle, and ablations of regions, k and prototypes per class."""
    return evaluate(EvalConfig(banks=(world["bank"],), heldout=world["heldout"], device="cpu",
                               modes=("vocabulary", "open_set", "foreground", "reference"),
                               ablations=parse_ablations(["regions=grid,hierarchy,refined", "prototypes=3"])))


def test_measured_targets(report):
    """Lower bounds, with margin, under the figures measured on this small corpus; docs/QUALITY.md gives a larger
    run's figures. The issue's targets (ratio 0.9, "no target" 0.95) are not met: the bounds say so."""
    base, oracle = report.row("base")["modes"], report.row("oracle")["modes"]
    assert report.heldout["images"] == 32 and report.encoder["name"] == "synthetic-clip"
    assert 0.55 <= base["vocabulary"]["miou"] < oracle["vocabulary"]["miou"]
    assert report.oracle_ratio("base") >= 0.6  # measured 0.659; the target is 0.9: NOT met (docs/QUALITY.md)
    hierarchy = report.row("regions=hierarchy")["modes"]["vocabulary"]["miou"]
    assert hierarchy >= base["vocabulary"]["miou"] - 0.05
    assert report.row("ceiling:hierarchy")["modes"]["vocabulary"]["miou"] > report.row(
        "ceiling:superpixel")["modes"]["vocabulary"]["miou"]
    assert base["open_set"]["miou"] >= 0.5
    # the refined preset (hierarchy + PAMR): measured vocabulary 0.702 (ratio 0.787), open set 0.666, foreground
    # IoU 0.820 / F 0.924 / MAE 0.046; still under the 0.9 target
    refined = report.row("regions=refined")["modes"]
    assert refined["vocabulary"]["miou"] >= max(0.66, hierarchy + 0.02) and report.oracle_ratio("regions=refined") >= 0.74
    assert refined["open_set"]["miou"] >= 0.62
    assert refined["foreground"]["iou"] >= 0.77 and refined["foreground"]["f_measure"] >= 0.87
    ref = base["reference"]
    assert ref["trials"] >= 40 and ref["present"] == ref["absent"]
    # margin decision (default): measured 0.816 / 0.879, accuracy 0.841, IoU 0.876 over 182 trials (the calibrated
    # rule of before: 0.732 / 0.901, 0.786); the target 0.95 is NOT met
    assert ref["no_target_precision"] >= 0.76 and ref["no_target_recall"] >= 0.82 and ref["accuracy"] >= 0.79
    assert ref["iou_present"] >= 0.8
    fg = base["foreground"]
    assert fg["iou"] >= 0.6 and fg["f_measure"] >= 0.75 and fg["mae"] <= 0.12


def test_report_is_consistent(report):
    """Per-class IoU, accuracy and mIoU recomputed from each confusion matrix; every row scores the same pixels."""
    pixels = {row["modes"]["vocabulary"]["pixels"] for row in report.rows}
    assert len(pixels) == 1
    for row in report.rows:
        m = row["modes"]["vocabulary"]
        matrix = np.array(m["confusion"])
        assert matrix.shape == (len(NAMES), len(NAMES) + 1) and matrix.sum() == m["pixels"]
        for c, name in enumerate(NAMES):
            union = matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]
            assert m["per_class_iou"][name] == (None if union == 0 else pytest.approx(matrix[c, c] / union, abs=1e-6))
        defined = [v for v in m["per_class_iou"].values() if v is not None]
        assert m["miou"] == pytest.approx(np.mean(defined), abs=1e-5)
        assert m["pixel_accuracy"] == pytest.approx(np.trace(matrix[:, :-1]) / matrix.sum())
    json.dumps(report.rows)  # JSON-ready


def test_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    truths = [rng.integers(-1, 4, (9, 7)) for _ in range(3)]
    preds = [rng.integers(-1, 4, (9, 7)) for _ in range(3)]
    confusion = Confusion(["a", "b", "c", "d"])
    for t, p in zip(truths, preds):
        confusion.add(t, p)
    t, p = np.concatenate([x.ravel() for x in truths]), np.concatenate([x.ravel() for x in preds])
    scored = t != IGNORED
    for c, name in enumerate("abcd"):
        inter = np.sum((t == c) & (p == c))
        union = np.sum((t == c) & scored) + np.sum((p == c) & scored) - inter
        assert confusion.summary()["per_class_iou"][name] == pytest.approx(inter / union, abs=1e-6)
    assert confusion.summary()["pixel_accuracy"] == pytest.approx(np.mean(t[scored] == p[scored]))
    assert mean_iou([x + 1 for x in truths], [x + 1 for x in truths], 4) == 1.0  # a perfect prediction
    binary = BinaryScores(beta2=1.0)
    binary.add(np.array([[1, 1, 0, IGNORED]]), np.array([[0.9, 0.2, 0.6, 1.0]]), 0.5)
    s = binary.summary()
    assert (s["iou"], s["precision"], s["recall"], s["f_measure"]) == (1 / 3, 0.5, 0.5, 0.5)
    assert s["mae"] == pytest.approx((0.1 + 0.8 + 0.6) / 3)
    trials = ReferenceScores()
    for present, said in [(True, True), (True, False), (False, False), (False, False), (False, True)]:
        mask = np.ones((2, 2), bool)
        trials.add(present, said, mask if present else None, (mask if said else ~mask) if present else None)
    s = trials.summary()
    assert (s["no_target_precision"], s["no_target_recall"], s["accuracy"]) == (2 / 3, 2 / 3, 3 / 5)
    assert s["iou_present"] == 0.5


def test_sliding_window_agrees_with_the_whole_image(world):
    """A window at least as large as the image is the whole-image run: the dense path's labels equal the
    Segmenter's label map; smaller overlapping windows cover every pixel."""
    run = _Run(EvalConfig(banks=(world["bank"],), heldout=world["heldout"], device="cpu"))
    segmenter = run.segmenter(0, "superpixel")
    prototypes, _ = segmenter.class_prototypes(NAMES)
    samples = [s for s in iter_samples(str(world["root"] / "corpus" / "heldout-000000.tar"), IngestConfig())][:3]
    for sample in samples:
        image = sample.image
        whole = segmenter.vocabulary(image, NAMES).label_map.astype(np.int64) - 1
        for crop in (None, image.shape[0], 4 * image.shape[0]):
            windows = window_regions(image, segmenter.regions, WindowConfig(crop=crop, stride=crop and 7))
            assert len(windows) == 1
            labels = vocabulary_labels(segmenter, windows, image.shape[:2], prototypes, image.shape[:2], None, None)
            np.testing.assert_array_equal(labels, whole)
        slid = window_regions(image, segmenter.regions, WindowConfig(crop=64, stride=32))
        assert len(slid) == 9
        labels = vocabulary_labels(segmenter, slid, image.shape[:2], prototypes, image.shape[:2], None, None)
        assert labels.shape == image.shape[:2] and labels.min() >= 0
    # mmseg's slide_inference grid: ⌈(side − crop) / stride⌉ + 1 windows per axis, the last one shifted back
    assert window_boxes(100, 150, 64, 40) == [(y, x, y + 64, x + 64) for y in (0, 36) for x in (0, 40, 80, 86)]
    assert resize_short_side(samples[0].image, 56).shape == (56, 56, 3)


def test_refined_preset_through_the_segmenter_equals_eval(world):
    """The `refined` preset (hierarchy + PAMR) labels pixels the same way in the Segmenter's modes as in the
    evaluator's scoring of a whole-image window; its pieces keep one label each and tile the image."""
    run = _Run(EvalConfig(banks=(world["bank"],), heldout=world["heldout"], device="cpu"))
    segmenter = run.segmenter(0, "refined")
    prototypes, _ = segmenter.class_prototypes(NAMES)
    samples = [s for s in iter_samples(str(world["root"] / "corpus" / "heldout-000000.tar"), IngestConfig())][:2]
    for sample in samples:
        image, shape = sample.image, sample.image.shape[:2]
        regions = segmenter.regions(image)
        windows = [((0, 0, *shape), regions)]
        result = segmenter.vocabulary(regions, NAMES)
        np.testing.assert_array_equal(vocabulary_labels(segmenter, windows, shape, prototypes, shape, None, None),
                                      result.label_map.astype(np.int64) - 1)
        assert len(result.regions) >= len(regions) and sum(r.area for r in result.regions) == image.shape[0] ** 2
        mine = segmenter.open_set(regions)
        labels = open_set_labels(segmenter, windows, shape, NAMES, OpenSetConfig(), shape)
        named = np.array([IGNORED] + [NAMES.index(c) for c in mine.classes])[mine.label_map.astype(np.int64)]
        np.testing.assert_array_equal(labels, named)
        fg = foreground_map(segmenter, windows, shape, ForegroundConfig(), shape)
        np.testing.assert_array_equal(fg >= 0.5, segmenter.foreground(regions).label_map == 1)


def test_p_prototypes_per_class_are_clusters_of_the_class(world):
    """P prototypes of "cat" are a k-means fixed point of the bank's cat segments nearest the class's mean: every
    such segment is nearest one centroid, and each centroid is the normalised mean of its segments."""
    run = _Run(EvalConfig(banks=(world["bank"],), heldout=world["heldout"], device="cpu"))
    segmenter, table, bank = run.segmenter(0, "superpixel"), run.opened[0].table, run.opened[0].bank
    config = VocabularyConfig(prototypes_per_class=3)
    (clustered,), matched = segmenter.class_prototypes(["cat"], config)
    assert clustered.shape == (3, segmenter.encoder.spec.visual_dim) and matched["cat"][0][0] == "cat"
    np.testing.assert_allclose(np.linalg.norm(clustered, axis=1), 1, atol=1e-5)
    (mean,), _ = segmenter.class_prototypes(["cat"])
    _, ids = segmenter.searcher.search(mean, config.prototype_neighbours)
    ids = ids[0][ids[0] >= 0]
    cats = ids[[label == "cat" for label in bank.labels(ids)]]
    points = bank.visual_embeddings(cats).astype(np.float64)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    assign = np.argmax(points @ clustered.T, axis=1)
    assert len(cats) > 3 and set(assign.tolist()) == {0, 1, 2}
    for c in range(3):
        centroid = points[assign == c].sum(axis=0)
        np.testing.assert_allclose(clustered[c], centroid / np.linalg.norm(centroid), atol=1e-4)
    bare = type(segmenter)(segmenter.encoder, segmenter.searcher, segmenter.metadata, table)
    with pytest.raises(ValueError, match="vectors="):
        bare.class_prototypes(["cat"], VocabularyConfig(prototypes_per_class=2))
    points = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0.1, 0.99, 0], [0, 0, 1]], np.float64)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    centroids = spherical_kmeans(points, 3)
    assert sorted(np.argmax(centroids, axis=1).tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(centroids, spherical_kmeans(points, 3))  # deterministic


def test_region_hierarchy_merges_exactly(world):
    """Greedy merges on a known case; a level's embedding is the builder's pooling of the union of its regions."""
    sums = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], np.float64)
    pairs = np.array([[0, 1], [1, 2], [2, 3]])
    fine, coarse = merge_levels(sums, pairs, (0.9, -0.5))
    assert fine.group.tolist() == [0, 0, 1, 1] and coarse.group.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="descending"):
        merge_levels(sums, pairs, (0.2, 0.8))
    run = _Run(EvalConfig(banks=(world["bank"],), heldout=world["heldout"], device="cpu"))
    sample = next(iter_samples(str(world["root"] / "corpus" / "heldout-000000.tar"), IngestConfig()))
    regions = run.segmenter(0, "hierarchy").regions(sample.image)
    assert len(regions.levels) == len(region_preset("hierarchy").merge_thresholds)
    assert adjacent_pairs(regions.labels).shape[1] == 2
    level = regions.levels[1]
    unions = [regions.masks[level.group == g].any(axis=0) for g in range(len(level.embeddings))]
    np.testing.assert_allclose(level.embeddings, embed_masks(run.encoder, sample.image, unions), atol=2e-3)


def test_convert_then_eval_scores_a_known_case(world, tmp_path):
    """ADE20K-layout fixture → `refbank convert` → eval: stripes on the encoder's grid cells, so the grid ceiling
    row is a perfect prediction (mIoU 1, every labelled pixel right); raw 0 ("other") is ignored."""
    root = tmp_path / "ADEChallengeData2016"
    for i, values in enumerate([[0, 1, 150, 3], [3, 10, 10, 0]]):
        stem = f"ADE_val_{i + 1:08d}"
        jpeg(root / "images/validation" / f"{stem}.jpg", i, size=(96, 48))
        png(root / "annotations/validation" / f"{stem}.png", blocks(values, size=(96, 48)))
    shards = convert(root, str(tmp_path / "shards"), ConvertConfig("ade20k", "validation")).shards
    result = evaluate(EvalConfig(banks=(world["bank"],), heldout=shards[0], device="cpu", modes=("vocabulary",),
                                 base=Variant(regions="grid")))
    assert result.heldout["classes"] == list(ADE20K_CLASSES)
    ceiling = result.row("ceiling:grid")["modes"]["vocabulary"]
    assert (ceiling["miou"], ceiling["pixel_accuracy"], ceiling["pixels"]) == (1.0, 1.0, 2 * 48 * 72)
    assert {k for k, v in ceiling["per_class_iou"].items() if v is not None} == {"wall", "flag", "sky", "grass"}
    with pytest.raises(ValueError, match="drop --reduce-zero-label"):
        evaluate(EvalConfig(banks=(world["bank"],), heldout=shards[0], device="cpu", modes=("vocabulary",),
                            protocol=Protocol(reduce_zero_label=True)))


def test_cli(world, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", world["bank"], world["heldout"], "--max-images", "3", "--mode", "vocabulary",
                                 "--json", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["heldout"]["images"] == 3 and [r["name"] for r in printed["rows"]] == ["base", "oracle",
                                                                                           "ceiling:superpixel"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"] == printed["rows"]
    assert (tmp_path / "out" / "per_class_iou_vocabulary.png").stat().st_size > 0
    bad = runner.invoke(app, ["eval", world["bank"], world["heldout"], "--ablate", "colour=red"])
    assert bad.exit_code == 2 and "KEY=V1,V2" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "nobank"), world["heldout"]])
    assert missing.exit_code == 2 and "error:" in missing.output


def test_open_set_labels_match_classes_as_vocabulary_mode_does():
    """A label that is a class name is that class; a phrase the class it is nearest by text; a label far from every
    class (weight < 0.1 × the class's best) counts for none; votes fold onto those classes."""
    from types import SimpleNamespace

    from jobs.eval.scoring import fold_shares
    from query.prototypes import class_labels

    def unit(*v: float) -> np.ndarray:
        return np.array(v, np.float32) / np.linalg.norm(v)

    labels = ["cat", "tabby cat", "lawn", "dog"]
    table = SimpleNamespace(labels=labels, text=np.stack([unit(1, 0, 0), unit(0.99, 0.05, 0.1), unit(0.1, 1, 0),
                                                          unit(0, 0, 1)]))
    classes, text = ["cat", "grass"], np.stack([unit(1, 0, 0), unit(0, 1, 0)])
    match = class_labels(table, text, classes)
    assert match == {"cat": "cat", "tabby cat": "cat", "lawn": "grass"}
    shares = np.array([[0.5, 0.2, 0.1, 0.1, 0.1]], np.float32)  # cat, tabby cat, lawn, dog, unlabelled
    folded = fold_shares([*labels, None], shares, classes, match)
    np.testing.assert_allclose(folded, [[0.7, 0.1, 0.1]])  # the unlabelled vote is ignored, "dog" is the rest
    np.testing.assert_allclose(fold_shares([*labels, None], shares, classes, match, "vote"), [[0.7, 0.1, 0.2]])
    np.testing.assert_allclose(fold_shares([*labels, None], shares, classes), [[0.5, 0.0, 0.4]])  # exact names
    only_unlabelled = np.array([[0, 0, 0, 0, 1.0]], np.float32)
    for rule in ("ignore", "vote"):  # a region only unlabelled segments vote for predicts no class either way
        np.testing.assert_allclose(fold_shares([*labels, None], only_unlabelled, classes, match, rule), [[0, 0, 1]])
