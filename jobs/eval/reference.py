"""Reference-mode trials: a pool of ground-truth reference prompts from the first held-out images, and per target
image the classes to ask about (present ones, and as many absent ones) with the answers scored."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jobs.eval.config import ReferenceTrials
from jobs.eval.metrics import ReferenceScores
from jobs.eval.truth import IGNORED
from query.regions import Reference, Regions
from query.render import upsample_nearest
from query.segment import ReferenceConfig, ReferencePrototype, Segmenter


@dataclass(frozen=True, eq=False)
class PoolEntry:
    """One class's reference: the held-out image it comes from and the prompt."""

    key: str
    reference: Reference


class ReferencePool:
    """Per class, its `shots` largest ground-truth masks among the pool images (one per image, each covering ≥
    min_fraction of that image's labelled pixels), as mask or box prompts."""

    def __init__(self, trials: ReferenceTrials, classes: list[str]) -> None:
        self.trials, self.classes = trials, classes
        self._offers: dict[int, list[tuple[int, int, PoolEntry]]] = {}  # class → (−area, order, entry)

    @property
    def entries(self) -> dict[int, list[PoolEntry]]:
        """class → its references, largest first."""
        return {c: [e for _, _, e in sorted(offers)[:self.trials.shots]] for c, offers in sorted(self._offers.items())}

    def keys(self, c: int) -> set[str]:
        """The images class c's references come from."""
        return {e.key for e in self.entries.get(c, [])}

    def offer(self, key: str, image: np.ndarray, truth: np.ndarray) -> None:
        """Consider an image's classes (truth: (H, W) class index or IGNORED, at the image's size)."""
        for c in present_classes(truth, self.trials.min_fraction):
            mask = truth == c
            entry = PoolEntry(key, _prompt(image, mask, self.classes[c], self.trials.prompt))
            offers = self._offers.setdefault(c, [])
            offers.append((-int(mask.sum()), len(offers), entry))

    def prepare(self, segmenter: Segmenter, config: ReferenceConfig) -> dict[int, list[ReferencePrototype]]:
        """Each pooled class's reference prototypes (one with ReferenceConfig.pool_shots), calibrated on the
        segmenter's bank."""
        entries = self.entries
        prepared = segmenter.prepare_references([e.reference for listed in entries.values() for e in listed], config)
        out: dict[int, list[ReferencePrototype]] = {c: [] for c in entries}
        index = {self.classes[c]: c for c in entries}
        for prototype in prepared:
            out[index[prototype.label]].append(prototype)
        return out


def present_classes(truth: np.ndarray, min_fraction: float) -> list[int]:
    """Classes covering ≥ min_fraction of the labelled pixels of a truth map, ascending."""
    labelled = truth[truth != IGNORED]
    if not labelled.size:
        return []
    counts = np.bincount(labelled)
    return [int(c) for c in np.flatnonzero(counts) if counts[c] / labelled.size >= min_fraction]


def trial_classes(key: str, truth: np.ndarray, pool: ReferencePool, image_index: int) -> list[tuple[int, bool]]:
    """(class, present) pairs to ask about one target image: every present class with references, none from this
    image, and as many classes with no pixel in it (drawn from the pooled ones with the trials' seed)."""
    pooled = pool.entries
    present = [c for c in present_classes(truth, pool.trials.min_fraction) if c in pooled and key not in pool.keys(c)]
    seen = set(np.unique(truth[truth != IGNORED]).tolist())
    absent = [c for c in pooled if c not in seen and key not in pool.keys(c)]
    rng = np.random.default_rng([pool.trials.seed, image_index])
    drawn = rng.choice(len(absent), size=min(len(present), len(absent)), replace=False) if absent else []
    return [(c, True) for c in present] + [(absent[j], False) for j in sorted(drawn)]


def score_trials(segmenter: Segmenter, regions: Regions, prototypes: dict[int, list[ReferencePrototype]],
                 trials: list[tuple[int, bool]], truth: np.ndarray, config: ReferenceConfig,
                 scores: ReferenceScores) -> None:
    """Ask about each (class, present) of one image with that class's references alone; the answer's "exists" and, for a
    present class, its mask against the class's true mask (ignored pixels left out) go into `scores`."""
    scored = truth != IGNORED
    for c, present in trials:
        result = segmenter.reference(regions, prototypes[c], config)
        if not present:
            scores.add(False, bool(result.exists))
            continue
        predicted = upsample_nearest(result.label_map, truth.shape) == 1
        target = (truth == c) & scored
        scores.add(True, bool(result.exists), target, predicted & scored, target.sum() / max(int(scored.sum()), 1))


def _prompt(image: np.ndarray, mask: np.ndarray, label: str, kind: str) -> Reference:
    """A mask prompt, or the mask's bounding box (XYXY, max exclusive)."""
    if kind == "mask":
        return Reference(image=image, mask=mask, label=label)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return Reference(image=image, box=(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1),
                     label=label)
