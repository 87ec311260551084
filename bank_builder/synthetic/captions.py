"""Noisy captions for synthetic scenes: what a captioning model might say about an image, wrong and missing
phrases included at controlled rates, with the truth recorded next to it so curation can be scored.

Noise model, per class present in the image (objects in painting order, then the background texture):
- with probability `missing_rate` it is not named at all (a missing phrase);
- otherwise it is named, and with probability `wrong_rate` the phrase names a class that is absent from
  the image instead (a wrong phrase; the class it replaced is then unnamed as well). Wrong phrases keep
  their role: an object is misnamed as another object, the background as another background texture.
So in expectation `wrong_rate` of the phrases are wrong, and `missing_rate + (1 - missing_rate) * wrong_rate`
of the classes present go unnamed. Each named class gets one of its phrase variants at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bank_builder.synthetic.scenes import CAPTION_OPENERS, caption_text, class_names, class_phrases, is_background


@dataclass(frozen=True)
class Caption:
    """A caption and the truth about it.

    text: the sentence. phrases: the noun phrases it names, in sentence order (objects, then background).
    phrase_classes: the class each phrase names (parallel to `phrases`). wrong: per phrase, True when its class
    is absent from the image. missing: classes present in the image that no phrase names, sorted.
    """

    text: str
    phrases: list[str]
    phrase_classes: list[str]
    wrong: list[bool]
    missing: list[str]

    def truth(self) -> dict[str, list]:
        """The JSON-ready record of what is right and wrong in the caption (the sample json's `caption_truth`)."""
        return {"phrase_classes": self.phrase_classes, "wrong": self.wrong, "missing": self.missing}


def check_rates(wrong_rate: float, missing_rate: float) -> None:
    """ValueError naming the fix when a rate is not a probability."""
    for name, rate in (("wrong_phrase_rate", wrong_rate), ("missing_phrase_rate", missing_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name}={rate}: use a probability in [0, 1]")


def noisy_caption(rng: np.random.Generator, labels: dict[int, str], wrong_rate: float = 0.0,
                  missing_rate: float = 0.0) -> Caption:
    """A caption of the classes in `labels` (instance id -> class) with wrong / missing phrases at the given rates."""
    check_rates(wrong_rate, missing_rate)
    present = list(dict.fromkeys(labels.values()))
    ordered = [n for n in present if not is_background(n)] + [n for n in present if is_background(n)]
    variants = class_phrases()
    opener = CAPTION_OPENERS[int(rng.integers(len(CAPTION_OPENERS)))]
    named: list[tuple[str, bool, str]] = []  # (class named, wrong, phrase)
    for name in ordered:
        # Four draws per class whatever the outcome: with the same seed a higher missing_rate drops a
        # superset of the classes, and a higher wrong_rate misnames a superset of the rest. A class with
        # no absent class of its role left to be misnamed as stays named correctly.
        drop, swap, pick, variant = rng.uniform(size=4)
        if drop < missing_rate:
            continue
        said, wrong = name, False
        if swap < wrong_rate:
            absent = [c for c in class_names() if c not in present and is_background(c) == is_background(name)
                      and c not in {n for n, _, _ in named}]
            if absent:
                said, wrong = absent[int(pick * len(absent))], True
        named.append((said, wrong, variants[said][int(variant * len(variants[said]))]))
    # `named` lists objects before the background (a scene has at most one, and swaps keep the role)
    text = caption_text(opener, [p for n, _, p in named if not is_background(n)],
                        [p for n, _, p in named if is_background(n)])
    return Caption(text=text, phrases=[p for _, _, p in named], phrase_classes=[n for n, _, _ in named],
                   wrong=[wrong for _, wrong, _ in named],
                   missing=sorted(set(present) - {n for n, wrong, _ in named if not wrong}))
