"""Options of `refbank eval` as frozen dataclasses: what to score (banks, held-out shards, modes, classes), the
test-time protocol and label conventions, the query options of each row (a base and one-factor ablations), and
how reference-mode trials are drawn."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from bank_builder.config import MaskKind
from query.reference import ReferenceConfig
from query.regions import REGION_PRESETS, RegionConfig
from query.votes import Unlabelled, check_unlabelled
from query.windows import WindowConfig

MODES = ("vocabulary", "open_set", "foreground", "reference")
OPEN_SET_MATCHES = ("text", "exact")
# The options a `--ablate KEY=V1,V2` may vary, with the type of their values.
ABLATION_KEYS: dict[str, type] = {"regions": str, "k": int, "labels_per_class": int, "prototypes": int,
                                  "prototype_neighbours": int}


@dataclass(frozen=True)
class Variant:
    """The query options of one row. regions: a query.regions.REGION_PRESETS name; k: neighbours of the open-set,
    foreground and reference kNN votes; labels_per_class, prototypes (per class), prototype_neighbours: vocabulary
    prototypes (query.prototypes.VocabularyConfig)."""

    name: str = "base"
    regions: str = "superpixel"
    k: int = 10
    labels_per_class: int = 3
    prototypes: int = 1
    prototype_neighbours: int = 256

    def __post_init__(self) -> None:
        if self.regions not in REGION_PRESETS:
            raise ValueError(f"unknown regions {self.regions!r}; use one of: {', '.join(REGION_PRESETS)}")
        for name in ("k", "labels_per_class", "prototypes", "prototype_neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Protocol:
    """Test-time protocol and label conventions (mmsegmentation's).

    windows: short-side resize, sliding-window crop and stride (query.windows); predictions are made at the
    resized size and their label map upsampled nearest to the ground truth's size. working_side: the
    Segmenter's working size (query.regions.RegionConfig.working_side). ignore_index: the class-mask value of
    unlabelled pixels (255; `refbank convert` writes it). reduce_zero_label: class masks whose 0 means
    "other" (ADE20K's raw annotations): 0 becomes ignored and every other id drops by one; corpora written by
    `refbank convert` are reduced already (it refuses them). background_threshold: a vocabulary-mode pixel
    whose best averaged cosine is below it is predicted `background_class` (a class name, e.g. VOC's
    "background"), or no class at all when that is None (counted as a miss of the true class)."""

    windows: WindowConfig = WindowConfig()
    working_side: int = RegionConfig.working_side
    ignore_index: int = 255
    reduce_zero_label: bool = False
    background_threshold: float | None = None
    background_class: str | None = None


@dataclass(frozen=True)
class ReferenceTrials:
    """How reference mode is scored. The references are ground-truth masks from the first `pool_images`
    held-out images (per class, its `shots` largest masks there, from distinct images: one class of that many
    references); each held-out image is then asked about every class present (covering ≥ min_fraction of its
    labelled pixels; an image never serves as its own reference) and about as many absent classes (no pixel),
    drawn with `seed`. Classes between 0 and min_fraction are not asked. prompt: "mask" or "box" (the mask's
    bounding box); fpr, decision, margin, recruit, pool_shots: query.reference.ReferenceConfig's (the
    calibration's false-positive rate, how "exists" is decided, the relative-score margin, the weight of recruited
    bank label prototypes, one prototype per class or per shot)."""

    pool_images: int = 16
    shots: int = 1
    min_fraction: float = 0.0025
    prompt: str = "mask"
    fpr: float = ReferenceConfig.fpr
    seed: int = 0
    decision: str = ReferenceConfig.decision
    margin: float = ReferenceConfig.margin
    recruit: float = ReferenceConfig.recruit
    pool_shots: bool = ReferenceConfig.pool_shots

    def __post_init__(self) -> None:
        if self.prompt not in ("mask", "box"):
            raise ValueError(f"reference prompt {self.prompt!r}: use 'mask' or 'box'")
        if self.pool_images < 1 or self.shots < 1 or not 0 <= self.min_fraction < 1:
            raise ValueError("pool_images and shots must be ≥ 1 and min_fraction in [0, 1)")
        self.query(ReferenceConfig.k)  # the query options checked where they are defined

    def query(self, k: int) -> ReferenceConfig:
        """The reference-mode options of a row whose kNN votes use k neighbours."""
        return ReferenceConfig(fpr=self.fpr, k=k, decision=self.decision, margin=self.margin, recruit=self.recruit,
                               pool_shots=self.pool_shots)


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    banks: bank URIs (built and indexed, one encoder); every bank gets a row with the `base` options (so a
    curated and an uncurated bank are two banks), and the ablations run on the first. heldout: shard
    pattern of the labelled held-out corpus (braces, globs, any fsspec URL); mask_kind: how to read its
    masks (auto: per sample). modes: any of MODES (foreground needs binary masks or labels outside
    ForegroundConfig's background labels). classes: the vocabulary and the scored classes; None = the
    corpus's class table (the first sample's json `classes`), else the first bank's labels. max_images:
    score only the first N held-out images. oracle: add a row per bank with ground-truth regions labelled
    by the nearest prototype (vocabulary), and a row per region preset where each region takes its majority
    true class (the ceiling of those regions). weights: a checkpoint overriding the weights the bank records.
    open_set_match: which bank labels' votes count for a class in open-set mode: "text" = the labels vocabulary
    mode matches to it by text (with the row's labels_per_class; a label equal to a class name is that class), so
    a bank labelled with caption phrases is scored too; "exact" = only labels equal to a class name. Encoders
    without a text tower match exactly. open_set_unlabelled: OpenSetConfig.unlabelled, how unlabelled
    neighbours vote: "ignore" (default) or "vote" (they win regions, which then predict no class)."""

    banks: tuple[str, ...]
    heldout: str
    modes: tuple[str, ...] = ("vocabulary", "open_set")
    mask_kind: MaskKind = MaskKind.AUTO
    classes: tuple[str, ...] | None = None
    max_images: int | None = None
    base: Variant = Variant()
    ablations: tuple[Variant, ...] = ()
    oracle: bool = True
    protocol: Protocol = Protocol()
    reference: ReferenceTrials = ReferenceTrials()
    foreground_threshold: float = 0.5
    f_beta2: float = 0.3
    weights: str | None = None
    open_set_match: str = "text"
    open_set_unlabelled: Unlabelled = "ignore"
    device: str = "auto"
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "banks", tuple(self.banks))
        object.__setattr__(self, "modes", tuple(dict.fromkeys(self.modes)))
        object.__setattr__(self, "mask_kind", MaskKind(self.mask_kind))
        if not self.banks:
            raise ValueError("give at least one bank to evaluate")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"unknown mode(s) {unknown or 'none given'}; use any of: {', '.join(MODES)}")
        if self.open_set_match not in OPEN_SET_MATCHES:
            raise ValueError(f"open_set_match={self.open_set_match!r}: use one of {', '.join(OPEN_SET_MATCHES)}")
        check_unlabelled(self.open_set_unlabelled, "open_set_unlabelled")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be ≥ 1, got {self.max_images}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        names = [v.name for v in (self.base, *self.ablations)]
        if len(set(names)) != len(names):
            raise ValueError(f"row names must be unique, got {names}")

    def variants(self) -> tuple[Variant, ...]:
        """The base options, then each ablation."""
        return (self.base, *self.ablations)


def parse_ablations(items: list[str], base: Variant = Variant()) -> tuple[Variant, ...]:
    """`KEY=V1,V2,...` items → one Variant per value, the base with only KEY changed, named "KEY=V"; ValueError
    naming the keys when an item does not parse."""
    variants = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in ABLATION_KEYS or not values.strip():
            raise ValueError(f"ablation {item!r}: use KEY=V1,V2 with KEY one of {', '.join(ABLATION_KEYS)} "
                             "(e.g. regions=grid,hierarchy or k=5,20)")
        for raw in values.split(","):
            try:
                value = ABLATION_KEYS[key](raw.strip())
            except ValueError:
                raise ValueError(f"ablation {item!r}: {raw.strip()!r} is not a {ABLATION_KEYS[key].__name__}") from None
            variants.append(replace(base, name=f"{key}={value}", **{key: value}))
    return tuple(variants)

