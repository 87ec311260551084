"""Noisy captions of the synthetic corpus: the truth they record, the rates they hit, determinism, the CLI flags."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from bank_builder.synthetic import (
    BACKGROUND_CLASSES,
    CorpusConfig,
    class_names,
    class_phrases,
    iter_scenes,
    make_corpus,
    noisy_caption,
)
from jobs.cli import app
from tests.test_synthetic import corpus_samples

OBJECTS = [c for c in class_names() if c not in BACKGROUND_CLASSES]


def label_sets(count: int, seed: int = 0) -> list[dict[int, str]]:
    """Random scene labels (instance id -> class) shaped like make_scene's: 1-5 objects, at most one background."""
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(count):
        names = [str(n) for n in rng.choice(OBJECTS, size=int(rng.integers(1, 6)))]
        if rng.uniform() < 0.8:
            names.insert(0, str(rng.choice(BACKGROUND_CLASSES)))
        sets.append(dict(enumerate(names, start=1)))
    return sets


def captions(wrong: float, missing: float, count: int = 2000) -> list:
    return [noisy_caption(np.random.default_rng([7, i]), labels, wrong, missing)
            for i, labels in enumerate(label_sets(count))]


def test_clean_captions_name_every_class_once():
    for labels, caption in zip(label_sets(300), captions(0.0, 0.0, 300)):
        assert sorted(caption.phrase_classes) == sorted(set(labels.values()))
        assert not any(caption.wrong) and caption.missing == []
        for phrase, name in zip(caption.phrases, caption.phrase_classes):
            assert phrase in class_phrases()[name] and phrase in caption.text


def test_truth_is_consistent_and_rates_are_hit():
    phrases = wrong = present = missing = 0
    for labels, caption in zip(label_sets(2000), captions(0.2, 0.3)):
        classes = set(labels.values())
        for name, is_wrong in zip(caption.phrase_classes, caption.wrong):
            assert (name not in classes) == is_wrong  # a wrong phrase names a class absent from the image
        assert not set(caption.phrase_classes[:-1]) & set(BACKGROUND_CLASSES)  # a background is named last
        named_right = {n for n, w in zip(caption.phrase_classes, caption.wrong) if not w}
        assert caption.missing == sorted(classes - named_right)
        phrases, wrong = phrases + len(caption.phrases), wrong + sum(caption.wrong)
        present, missing = present + len(classes), missing + len(caption.missing)
    # expected: 0.2 of the phrases wrong; 0.3 + 0.7 × 0.2 = 0.44 of the classes unnamed (see captions.py)
    assert wrong / phrases == pytest.approx(0.2, abs=0.02)
    assert missing / present == pytest.approx(0.44, abs=0.02)


def test_same_seed_same_captions_and_a_higher_rate_drops_more():
    low, again, high = captions(0.0, 0.2, 500), captions(0.0, 0.2, 500), captions(0.0, 0.5, 500)
    assert low == again
    assert all(set(a.missing) <= set(b.missing) for a, b in zip(low, high))
    assert sum(len(c.missing) for c in high) > sum(len(c.missing) for c in low)
    swapped = noisy_caption(np.random.default_rng(3), {1: "grass", 2: "cat"}, 1.0, 0.0)
    assert swapped.wrong == [True, True] and swapped.phrase_classes[1] in ("brick", "gravel")  # roles are kept
    assert swapped.text.index(swapped.phrases[0]) < swapped.text.index(" on ")  # objects first, then "on" background


def test_corpus_json_carries_captions_and_images_do_not_change(tmp_path):
    noisy = CorpusConfig(shards=1, samples_per_shard=6, image_size=64, seed=31, captions=True,
                         wrong_phrase_rate=0.3, missing_phrase_rate=0.3)
    make_corpus(str(tmp_path / "noisy"), noisy)
    make_corpus(str(tmp_path / "plain"), replace(noisy, captions=False, wrong_phrase_rate=0.0, missing_phrase_rate=0.0))
    written, plain = corpus_samples(tmp_path / "noisy"), corpus_samples(tmp_path / "plain")
    expected = {key: caption for key, _, caption in iter_scenes(noisy)}
    for key, sample in written.items():
        assert sample["jpg"] == plain[key]["jpg"] and sample["mask.png"] == plain[key]["mask.png"]
        meta = json.loads(sample["json"])
        assert (meta["caption"], meta["phrases"]) == (expected[key].text, expected[key].phrases)
        assert meta["caption_truth"] == expected[key].truth()
        assert "caption_truth" not in json.loads(plain[key]["json"])


def test_cli_flags(tmp_path):
    runner = CliRunner()
    made = runner.invoke(app, ["make-corpus", str(tmp_path / "c"), "--shards", "1", "--samples-per-shard", "2",
                               "--image-size", "64", "--captions", "--wrong-phrase-rate", "0.5",
                               "--missing-phrase-rate", "0.1"])
    assert made.exit_code == 0, made.output
    assert all("caption_truth" in json.loads(s["json"]) for s in corpus_samples(tmp_path / "c").values())
    refused = runner.invoke(app, ["make-corpus", str(tmp_path / "d"), "--wrong-phrase-rate", "0.2"])
    assert refused.exit_code == 2 and "--captions" in refused.output
    bad = runner.invoke(app, ["make-corpus", str(tmp_path / "e"), "--captions", "--missing-phrase-rate", "1.5"])
    assert bad.exit_code == 2 and "probability" in bad.output
