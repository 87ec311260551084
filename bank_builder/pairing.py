"""Pairing: a captioned image's unlabelled segments labelled with its candidate phrases (ReME's rule), in the build.

Candidate phrases: the sample json's `phrases` (a list of strings), else the noun phrases chunked out of its
`caption` (bank_builder.phrases), each normalised to a label (`phrases.normalise_phrase`: "a tabby cat" →
"tabby cat"), each once. Similarity: the cosine between a segment's visual embedding and the text embedding of
the phrase's label, prompted as every label is (embed.TEXT_TEMPLATE), both as stored (float16). Each phrase is
paired with its best segment (ReME's rule). Rule "mutual" (the default) takes that best segment among the
segments whose own best phrase it is, so a phrase naming something no segment shows (a wrong phrase, or an
object smaller than any superpixel) pairs with nothing instead of with the least bad segment; rule "best"
takes the best segment of all, and a segment that several phrases choose keeps the most similar one. With a
threshold, every other unlabelled segment whose best phrase reaches it takes that phrase too. Then the margin
(default 0.05): a segment keeps its phrase only when its cosine to it beats its cosine to every other phrase of the
image by at least the margin. Why: on a tuning corpus most wrong pairs were segments torn between two phrases
(a superpixel straddling two objects, or the best stand-in for an object smaller than any superpixel): their
best-minus-second cosine was 0.14 at the median against 0.52 for right pairs (docs/QUALITY.md "Curation").
A paired segment gets the normalised phrase as its label and label_source "paired"; the rest stay unlabelled,
and curation (bank_builder.curate) drops them.

Why here and not in the curate pass: pairing needs each image's phrases and the text tower, which the encoder
actor has while it encodes the image's segments, and it involves nothing beyond one image, so the part can
hold its result. Parts are immutable; the curate pass, which needs every part at once, only reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bank_builder.config import PairingConfig
from bank_builder.format.parts import SegmentRows
from bank_builder.phrases import PhraseConfig, chunk_phrases, normalise_phrase
from bank_builder.records import LabelSource


def candidate_phrases(meta: dict[str, Any], config: PairingConfig) -> list[str]:
    """The labels a sample's phrases offer: json `phrases` (strings), else `caption` chunked; normalised, each once,
    in order; [] when the sample names nothing."""
    raw = meta.get("phrases")
    if isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        phrases = raw
    elif isinstance(meta.get("caption"), str):
        phrases = chunk_phrases(meta["caption"], PhraseConfig(backend=config.phrase_backend))
    else:
        return []
    return list(dict.fromkeys(label for label in map(normalise_phrase, phrases) if label))


def pair_image(visual: np.ndarray, text: np.ndarray, config: PairingConfig) -> np.ndarray:
    """(n,) int64 phrase of each of an image's unlabelled segments, -1 = unpaired, for their visual embeddings
    (n, C) and the phrases' text embeddings (P, C), both L2-normalised. Ties go to the lower index."""
    chosen = np.full(len(visual), -1, np.int64)
    if not len(visual) or not len(text):
        return chosen
    sims = visual.astype(np.float32) @ text.astype(np.float32).T  # (n, P) cosines
    best_phrase = sims.argmax(axis=1)
    if config.rule == "mutual":
        for phrase in range(len(text)):  # its best segment among those whose own best phrase it is
            candidates = np.flatnonzero(best_phrase == phrase)
            if len(candidates):
                chosen[candidates[sims[candidates, phrase].argmax()]] = phrase
    else:
        best_segment = sims.argmax(axis=0)
        claims = sims[best_segment, np.arange(len(text))]
        for phrase in np.lexsort((np.arange(len(text)), -claims)):  # most similar claim first
            if chosen[best_segment[phrase]] < 0:
                chosen[best_segment[phrase]] = phrase
    if config.threshold is not None:
        extra = (chosen < 0) & (sims[np.arange(len(visual)), best_phrase] >= config.threshold)
        chosen[extra] = best_phrase[extra]
    if config.margin > 0 and len(text) > 1:
        top2 = np.sort(sims, axis=1)[:, -2:]
        paired = np.flatnonzero(chosen >= 0)
        # a segment's cosine to its chosen phrase ("best" may choose one that is not its own best) less its best other
        other = np.where(best_phrase[paired] == chosen[paired], top2[paired, 0], top2[paired, 1])
        chosen[paired[sims[paired, chosen[paired]] - other < config.margin]] = -1
    return chosen


def pair_batch(rows: SegmentRows, image_index: np.ndarray, visual: np.ndarray, phrases: list[list[str]],
               embed: Callable[[list[str]], list[np.ndarray]], config: PairingConfig) -> np.ndarray:
    """Pair the unlabelled segments of each image of a batch with the image's phrases (`phrases[i]` for image i),
    changing `rows` in place (label, label_source "paired"); returns the rows paired, ascending.

    image_index: (n,) image of each row; visual: (n, C) float16 embeddings; embed: labels → text embeddings
    (the encoder's label embedding, cached)."""
    paired = []
    unlabelled = np.array([label is None for label in rows.label], bool)
    for image, labels in enumerate(phrases):
        members = np.flatnonzero((image_index == image) & unlabelled)
        if not labels or not len(members):
            continue
        chosen = pair_image(visual[members], np.stack(embed(labels)), config)
        for row, phrase in zip(members[chosen >= 0], chosen[chosen >= 0]):
            rows.label[row], rows.label_source[row] = labels[phrase], LabelSource.PAIRED.value
            paired.append(int(row))
    return np.array(sorted(paired), np.int64)
