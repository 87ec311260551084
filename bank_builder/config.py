"""Options of every build stage as small typed dataclasses; the manifest records them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from bank_builder.format.ref import BankRef


class MaskKind(str, Enum):
    """How to read a sample's mask (see docs/CORPUS.md)."""

    AUTO = "auto"  # per sample, from the members present and the json keys (see `IngestConfig`)
    INSTANCE = "instance"  # mask.png: pixel = segment id, 0 = unlabeled; labels from json `segments`
    CLASS = "class"  # mask.png: pixel = class index; names from json `classes`; `ignore_value` skipped
    BINARY = "binary"  # mask.png: non-zero = foreground; label from json `label`
    RLE = "rle"  # rle.json: COCO / SA-1B annotations (RLE or polygon)
    NONE = "none"  # ignore masks; every image is segmented into superpixels


class OnMissingMask(str, Enum):
    """What becomes of a sample without a usable mask."""

    REJECT = "reject"  # a `missing_mask` (or `unknown_mask_kind`) reject row
    SUPERPIXELS = "superpixels"  # class-agnostic, unlabelled superpixel segments


# How many leading samples of a shard `mask_kind=auto` looks at to tell whether the shard has masks.
MASK_PROBE_SAMPLES = 16


@dataclass(frozen=True)
class IngestConfig:
    """Which tar members make a sample, how its mask is read, and how strictly it is validated.

    mask_kind AUTO reads each sample by what it holds: `mask.png` with json `segments` → instance, else
    with json `label` → binary, else with json `classes` → class (the first key present decides); else
    `rle.json` → RLE; a `mask.png` alone is no usable mask (`unknown_mask_kind`).
    on_missing_mask: what becomes of a sample with no usable mask. None (the default) decides per
    shard: REJECT when the shard has masks, SUPERPIXELS when it has none. A shard has masks when
    mask_kind names a format, or (AUTO) when one of its first MASK_PROBE_SAMPLES samples has a mask
    member; so a mask-free corpus needs no option, and a masked one never turns silently unlabelled.
    mask_kind NONE ignores masks: superpixels for every image.
    """

    mask_kind: MaskKind = MaskKind.AUTO
    on_missing_mask: OnMissingMask | None = None
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    mask_key: str = "mask.png"
    rle_key: str = "rle.json"
    json_key: str = "json"
    max_image_pixels: int = 50_000_000  # decompression-bomb guard

    def __post_init__(self) -> None:
        # Accept "rle" as well as MaskKind.RLE (configs come from JSON and the CLI); stages compare enums.
        object.__setattr__(self, "mask_kind", _enum(MaskKind, self.mask_kind, "mask_kind"))
        if self.on_missing_mask is not None:
            object.__setattr__(self, "on_missing_mask", _enum(OnMissingMask, self.on_missing_mask, "on_missing_mask"))
        if self.mask_kind is MaskKind.NONE and self.on_missing_mask is OnMissingMask.REJECT:
            raise ValueError("mask_kind=none ignores every mask, so on_missing_mask=reject would reject every "
                             "sample; drop one of the two")


def _enum(cls: type[Enum], value: Any, name: str) -> Any:
    """`value` as a member of `cls`; ValueError listing the allowed values."""
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(k.value for k in cls)
        raise ValueError(f"unknown {name} {value!r}; use one of: {known}") from None


@dataclass(frozen=True)
class SegmentConfig:
    """How masks become segments, and the superpixel fallback for unmasked images."""

    min_area: int = 64  # pixels; smaller segments are dropped
    ignore_value: int = 255  # class masks: this pixel value is unlabeled
    max_segments: int = 256  # per image, largest first
    superpixel_scale: float = 200.0
    superpixel_sigma: float = 0.8
    superpixel_min_size: int = 100


@dataclass(frozen=True)
class PairingConfig:
    """Pairing of a captioned image's unlabelled segments with its candidate phrases (bank_builder.pairing).

    enabled: pair whenever a sample has phrases (json `phrases`, else its `caption` chunked) and segments without
    a label, and the encoder has a text tower. rule: how a phrase picks its best segment (bank_builder.pairing):
    "mutual", among the segments whose own best phrase it is, or "best", among all. threshold: None = that rule
    alone (each phrase labels at most one segment); a cosine also labels every other unlabelled segment whose
    best phrase reaches it. margin: a segment is paired (by the rule or the threshold) only when its cosine to
    the phrase exceeds its cosine to each other phrase of the image by at least this much (0: the rule alone, as
    before; 0.05 was chosen on a tuning corpus, docs/QUALITY.md "Curation"). phrase_backend:
    the caption chunker (bank_builder.phrases.PhraseConfig); "rules" by default, so a build gives the same parts
    whether or not spaCy is installed."""

    enabled: bool = True
    rule: str = "mutual"
    threshold: float | None = None
    margin: float = 0.05
    phrase_backend: str = "rules"

    def __post_init__(self) -> None:
        if self.rule not in ("mutual", "best"):
            raise ValueError(f"PairingConfig.rule={self.rule!r}: use 'mutual' or 'best'")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"PairingConfig.threshold={self.threshold}: use a cosine in [-1, 1], or None")
        if not 0.0 <= self.margin <= 2.0:
            raise ValueError(f"PairingConfig.margin={self.margin}: use a cosine difference in [0, 2] (0: no margin)")
        if self.phrase_backend not in ("auto", "rules", "spacy"):
            raise ValueError(f"PairingConfig.phrase_backend={self.phrase_backend!r}: use 'rules', 'auto' or 'spacy'")


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder to run and which weights to load.

    weights: "pretrained" (the registry entry's pretrained tag / timm name), "untrained" (the same
    architecture with seeded random weights; recorded in the spec, never chosen silently), or a local
    checkpoint path. entry: the encoder's whole registry entry (an open_clip `model_config` as its JSON
    content, not a path); it travels with the job to every worker and into the bank, so an encoder
    defined only in a config file builds and serves anywhere. None: the entry registered as `name` in
    this process (a BuildConfig fills it in). `bank_builder.encoders.encoder_config_from_file` makes one
    from a config file.
    """

    name: str = "clip-vit-b16"
    weights: str = "pretrained"
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when the actor has a GPU, else cpu
    entry: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.entry is not None and (not isinstance(self.entry, dict) or self.entry.get("name") != self.name):
            got = self.entry.get("name") if isinstance(self.entry, dict) else type(self.entry).__name__
            raise ValueError(f"EncoderConfig(name={self.name!r}) carries the entry of {got!r}; an entry must be the "
                             "dict of the encoder it names (use encoder_config_from_file to build both from a file)")


@dataclass(frozen=True)
class PipelineConfig:
    """How the Ray build spreads work: batches, encoder actors and their resources, retries, memory bounds.

    None means sized from the cluster when the build starts (`encoder_pool.plan_placement`): one encoder actor
    per GPU, or one CPU actor that takes its node's CPUs but room for two decode tasks; decode tasks take one
    CPU each beside GPUs, 0.25 beside a CPU encoder (decode is light next to a CPU forward pass).
    """

    # Images per forward pass; with the encoder, what decides a part's bytes. None: the bank's recorded one, else
    # sized from the model and device (bank_builder.batching); the manifest records the value used.
    batch_size: int | None = None
    # Batches per decode output, each output one encoder call. None: decoded chunks of about chunk_bytes, and as
    # many chunks per call as the measured forward time asks for (bank_builder.batching); never changes a byte.
    batches_per_call: int | None = None
    chunk_bytes: int = 16 * 2**20  # decoded input (S×S×3 bytes an image) per chunk when batches_per_call is None
    num_encoders: int | None = None  # None: one per GPU, or one CPU actor when there is no GPU
    # GPU encoder actors to ask for whatever the cluster has now: on an autoscaling cluster the GPU nodes start
    # when the build's placement group asks for them (within encoder_start_timeout_s). None: the GPUs present
    # at the start (none: a CPU actor); 0: CPU actors even beside GPUs.
    gpus: int | None = None
    cpus_per_encoder: float | None = None  # None: 0 for a GPU actor; a CPU actor, its node's CPUs less decode's
    cpus_per_decode: float | None = None  # each decode (and write) task; None: 1 with GPUs, else 0.25
    max_shards_in_flight: int | None = None  # None: 2 per encoder actor + 1, or one per CPU left for decode
    max_calls_per_encoder: int = 2  # queued encoder calls per actor (backpressure)
    # Decoded input (S×S×3 bytes an image) the driver holds for the actors beyond their queues, so decode runs on
    # while the models load and while every actor is busy, and that decode work is not left for later.
    bytes_ahead: int = 512 * 2**20
    max_attempts: int = 3  # a shard that fails this many times is reported as failed
    progress_interval_s: float = 10.0  # plain console lines: one per finished shard, else at most this often
    encoder_start_timeout_s: float = 600.0  # longest wait for an encoder actor to be placed and loaded
    # Import path of a module whose `decode_shard` and `EncoderWorker` replace the real ones (same signatures):
    # bench/driver_scale.py measures the driver alone with it. No CLI option sets it; the manifest records it.
    stand_in: str | None = None


@dataclass(frozen=True)
class BuildConfig:
    """Everything one `build_bank` run needs; saved in the manifest of the version it publishes.

    The encoder's registry entry is pinned into `encoder` here, on the driver, so the workers (other
    processes, other machines) never look a name up in a registry of their own.
    """

    source: str  # shard URL pattern: local path, file://, s3://, with {a..b} braces and globs
    bank: str  # bank URI (local dir or s3://bucket/prefix)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    segments: SegmentConfig = field(default_factory=SegmentConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options, e.g. endpoint_url
    pairing: PairingConfig = field(default_factory=PairingConfig)

    def __post_init__(self) -> None:
        for name, kind in (("ingest", IngestConfig), ("segments", SegmentConfig), ("encoder", EncoderConfig),
                           ("pipeline", PipelineConfig), ("pairing", PairingConfig)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                example = f"{kind.__name__}(name={value!r})" if isinstance(value, str) and kind is EncoderConfig \
                    else f"{kind.__name__}(...)"
                article = "an" if kind.__name__[0] in "AEIOU" else "a"
                raise TypeError(f"BuildConfig.{name} must be {article} {kind.__name__}, got {type(value).__name__} "
                                f"{value!r}; pass {name}={example}")
        if self.encoder.entry is None:
            from bank_builder.encoders.registry import get_encoder_entry  # here: the registry imports this module

            object.__setattr__(self, "encoder", replace(self.encoder, entry=get_encoder_entry(self.encoder.name)))

    @property
    def bank_ref(self) -> BankRef:
        """The bank as a BankRef (URI + storage options)."""
        return BankRef(self.bank, self.storage_options)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (enums as their values, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(asdict(config))


def fingerprint_fields(config: BuildConfig) -> dict[str, Any]:
    """The options that change a part's content; parts built with other values are not reused."""
    return {
        "ingest": config_to_dict(config.ingest),
        "segments": config_to_dict(config.segments),
        "pairing": config_to_dict(config.pairing),
        # device changes nothing stored; the entry is part of the encoder spec, which the fingerprint hashes
        "encoder": {f.name: getattr(config.encoder, f.name) for f in fields(config.encoder)
                    if f.name not in ("device", "entry")},
    }


def option_differences(recorded: dict[str, Any], config: BuildConfig) -> list[str]:
    """'<section>.<option>: bank X, this build Y' for each option of `fingerprint_fields` whose value differs
    from the build options a manifest records (`recorded`); [] when they all agree."""
    out = []
    for section, values in fingerprint_fields(config).items():
        had = recorded.get(section) or {}
        for key, value in values.items():
            if had.get(key) != value:
                out.append(f"{section}.{key}: bank {had.get(key)!r}, this build {value!r}")
    return out
