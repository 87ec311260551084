"""Options of every build stage as small typed dataclasses; the manifest records them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from bank_builder.format.ref import BankRef


class MaskKind(str, Enum):
    """How to read a sample's mask (see DESIGN.md, corpus convention)."""

    INSTANCE = "instance"  # mask.png: pixel = segment id, 0 = unlabeled; labels from json `segments`
    CLASS = "class"  # mask.png: pixel = class index; names from json `classes`; `ignore_value` skipped
    BINARY = "binary"  # mask.png: non-zero = foreground; label from json `label`
    RLE = "rle"  # rle.json: COCO / SA-1B annotations (RLE or polygon)
    NONE = "none"  # ignore masks; every image is segmented into superpixels


@dataclass(frozen=True)
class IngestConfig:
    """Which tar members make a sample, and how strictly to validate it."""

    mask_kind: MaskKind = MaskKind.INSTANCE
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    mask_key: str = "mask.png"
    rle_key: str = "rle.json"
    json_key: str = "json"
    require_mask: bool = False  # True: a sample without a mask is a reject, not superpixels
    max_image_pixels: int = 50_000_000  # decompression-bomb guard

    def __post_init__(self) -> None:
        # Accept "rle" as well as MaskKind.RLE (configs come from JSON and the CLI); stages compare enums.
        try:
            object.__setattr__(self, "mask_kind", MaskKind(self.mask_kind))
        except ValueError:
            known = ", ".join(k.value for k in MaskKind)
            raise ValueError(f"unknown mask_kind {self.mask_kind!r}; use one of: {known}") from None


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
class EncoderConfig:
    """Which encoder to run and which weights to load.

    weights: "pretrained" (the registry entry's pretrained tag / timm name), "untrained" (the same
    architecture with seeded random weights; recorded in the spec, never chosen silently), or a local
    checkpoint path.
    """

    name: str = "clip-vit-b16"
    weights: str = "pretrained"
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when the actor has a GPU, else cpu


@dataclass(frozen=True)
class PipelineConfig:
    """How the Ray build spreads work: batch size, encoder actors, retries, memory bounds."""

    batch_size: int = 16  # images per encoder call
    num_encoders: int | None = None  # None: one per GPU, or one CPU actor when there is no GPU
    cpus_per_encoder: float = 1.0
    max_shards_in_flight: int | None = None  # None: 2 per encoder actor + 1
    max_batches_per_encoder: int = 2  # queued encoder calls per actor (backpressure)
    max_attempts: int = 3  # a shard that fails this many times is reported as failed
    progress_interval_s: float = 2.0


@dataclass(frozen=True)
class BuildConfig:
    """Everything one `build_bank` run needs; saved in the manifest of the version it publishes."""

    source: str  # shard URL pattern: local path, file://, s3://, with {a..b} braces and globs
    bank: str  # bank URI (local dir or s3://bucket/prefix)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    segments: SegmentConfig = field(default_factory=SegmentConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options, e.g. endpoint_url

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
        "encoder": {f.name: getattr(config.encoder, f.name) for f in fields(config.encoder) if f.name != "device"},
    }
