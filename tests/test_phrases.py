"""The noun-phrase chunker: it recovers the phrases of generated captions exactly, handles everyday caption
grammar, and only uses spaCy when asked for and installed."""

from __future__ import annotations

import importlib.util

import pytest

from bank_builder.phrases import PhraseConfig, chunk_phrases
from bank_builder.synthetic import CorpusConfig, iter_scenes
from tests.test_captions import captions

RULES = PhraseConfig(backend="rules")


def test_recovers_the_phrases_of_noisy_generated_captions():
    generated = captions(0.3, 0.2, 1000)
    assert len({c.text for c in generated}) > 800  # varied openers, phrase variants, lists
    for caption in generated:
        assert chunk_phrases(caption.text, RULES) == caption.phrases, caption.text
    config = CorpusConfig(shards=1, samples_per_shard=8, image_size=32, seed=21, captions=True)
    for _, _, caption in iter_scenes(config):  # and those of a written corpus
        assert chunk_phrases(caption.text, RULES) == caption.phrases, caption.text


@pytest.mark.parametrize("caption, phrases", [
    ("A cat sitting on the grass next to a tall building.", ["a cat", "the grass", "a tall building"]),
    ("a photo of a cup of coffee", ["a cup of coffee"]),  # the picture is not a phrase; "cup of" keeps its object
    ("a close-up of a red motorcycle parked near a wall of bricks", ["a red motorcycle", "a wall of bricks"]),
    ("two dogs playing with a ball in the park", ["two dogs", "a ball", "the park"]),
    ("the roof of a house", ["the roof", "a house"]),  # "of" after other nouns splits
    ("a cat and a cat", ["a cat"]),  # each phrase once
    ("an image of an empty scene", []),
    ("", []),
])
def test_everyday_caption_grammar(caption, phrases):
    assert chunk_phrases(caption, RULES) == phrases


def test_auto_backend_falls_back_to_the_rules_without_spacy():
    text = "a picture of an astronaut and a rocket on gravel"
    assert chunk_phrases(text, RULES) == ["an astronaut", "a rocket", "gravel"]
    if importlib.util.find_spec("spacy") is None:
        assert chunk_phrases(text) == chunk_phrases(text, RULES)


@pytest.mark.skipif(importlib.util.find_spec("spacy") is not None, reason="spaCy is installed here")
def test_spacy_backend_without_spacy_names_the_fix():
    with pytest.raises(ValueError, match="pip install spacy"):
        chunk_phrases("a cat", PhraseConfig(backend="spacy"))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="'auto', 'rules' or 'spacy'"):
        PhraseConfig(backend="nltk")
