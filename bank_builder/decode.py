"""Decode one sample: its tar members ({extension: bytes}) → a validated Sample (image, json, the mask and the
kind to read it as), or a Reject saying why not. Part of the ingest stage; `ingest.iter_samples` calls it."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from bank_builder.config import IngestConfig, MaskKind, OnMissingMask
from bank_builder.records import Reject, RejectError, RejectReason, Sample


def decode_sample(shard: str, key: str, index: int, members: dict[str, bytes], config: IngestConfig,
                  on_missing: OnMissingMask = OnMissingMask.REJECT) -> Sample | Reject:
    """Decode one group of members ({extension: bytes}) into a validated Sample, or a Reject.

    on_missing: what a sample without a usable mask becomes (a reject, or a Sample without mask_kind,
    which the segments stage cuts into superpixels); iter_samples resolves it per shard.
    """
    try:
        image = _decode_image(members, config)
        meta = _decode_meta(members, config)
        kind = _mask_kind(members, meta, config, on_missing)
        mask, annotations = _decode_mask(members, kind, config, image.shape[:2])
    except RejectError as exc:
        return exc.to_reject(shard, key)
    return Sample(shard=shard, key=key, index=index, image=image, mask_kind=kind, mask=mask,
                  annotations=annotations, meta=meta)


def _open_image(data: bytes, member: str, reason: RejectReason) -> Image.Image:
    """PIL image of a member, header only (pixels not decoded yet)."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RejectError(RejectReason.IMAGE_TOO_LARGE, f"{member}: {exc} (PIL's Image.MAX_IMAGE_PIXELS)") from exc
    except Exception as exc:  # PIL raises many types on corrupt input (OSError, SyntaxError, ...)
        raise RejectError(reason, f"{member} is not a readable image: {exc}") from exc


def _load(image: Image.Image, member: str, reason: RejectReason) -> None:
    """Decode the pixels; truncated or corrupt data becomes a reject."""
    try:
        image.load()
    except Exception as exc:  # see _open_image
        raise RejectError(reason, f"{member} cannot be decoded: {exc}") from exc


def _decode_image(members: dict[str, bytes], config: IngestConfig) -> np.ndarray:
    """(H, W, 3) uint8 RGB from the first image member present, size-checked before decoding."""
    ext = next((e for e in config.image_keys if e in members), None)
    if ext is None:
        raise RejectError(
            RejectReason.MISSING_IMAGE,
            f"no image member: expected one of {list(config.image_keys)}, found {sorted(members)}",
        )
    image = _open_image(members[ext], ext, RejectReason.UNDECODABLE_IMAGE)
    width, height = image.size
    if width * height > config.max_image_pixels:
        raise RejectError(
            RejectReason.IMAGE_TOO_LARGE,
            f"{ext} is {width}x{height} = {width * height} px > max_image_pixels={config.max_image_pixels}; "
            "raise IngestConfig.max_image_pixels to keep it",
        )
    _load(image, ext, RejectReason.UNDECODABLE_IMAGE)
    # No EXIF transpose: masks are aligned with the stored pixels, not with the display orientation.
    return _to_rgb(image)


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any PIL mode; 16-bit grey is scaled (PIL's convert would clip it at 255)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _decode_meta(members: dict[str, bytes], config: IngestConfig) -> dict[str, Any]:
    """The parsed json member (an object), {} when absent."""
    if config.json_key not in members:
        return {}
    meta = _parse_json(members[config.json_key], config.json_key, RejectReason.BAD_JSON)
    if not isinstance(meta, dict):
        raise RejectError(RejectReason.BAD_JSON, f"{config.json_key} holds a {type(meta).__name__}, expected an object")
    return meta


def _parse_json(data: bytes, member: str, reason: RejectReason) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise RejectError(reason, f"{member} is not valid JSON: {exc}") from exc


# AUTO: with a mask.png, the first of these json keys present (and of this type) names the mask kind.
# `label` comes before `classes` because a binary sample's json may carry a dataset's whole class table.
_KIND_KEYS = (("segments", list, MaskKind.INSTANCE), ("label", str, MaskKind.BINARY), ("classes", dict, MaskKind.CLASS))


def _mask_kind(members: dict[str, bytes], meta: dict[str, Any], config: IngestConfig,
               on_missing: OnMissingMask) -> MaskKind | None:
    """How to read this sample's mask; None (superpixels) or a RejectError when it has no usable one.

    AUTO: a mask.png whose json names its kind, else an rle.json, else no usable mask.
    """
    kind = config.mask_kind
    if kind is MaskKind.NONE:
        return None
    if kind is not MaskKind.AUTO:
        member = config.rle_key if kind is MaskKind.RLE else config.mask_key
        if member in members:
            return kind
        return _missing(on_missing, RejectReason.MISSING_MASK,
                        f"no {member} member (mask_kind={kind.value}), found {sorted(members)}; pass "
                        "--mask-kind auto to read each sample by what it holds")
    if config.mask_key in members:
        found = next((k for key, kind_type, k in _KIND_KEYS if isinstance(meta.get(key), kind_type)), None)
        if found is not None:
            return found
    if config.rle_key in members:
        return MaskKind.RLE
    if config.mask_key in members:
        return _missing(on_missing, RejectReason.UNKNOWN_MASK_KIND,
                        f"{config.mask_key} but the {config.json_key} has none of `segments` (instance ids), "
                        "`label` (binary) or `classes` (class indices); add the one that fits, or pass --mask-kind")
    return _missing(on_missing, RejectReason.MISSING_MASK,
                    f"no mask member ({config.mask_key} or {config.rle_key}), found {sorted(members)}")


def _missing(on_missing: OnMissingMask, reason: RejectReason, detail: str) -> None:
    """None (cut the sample into superpixels), or the RejectError the policy asks for."""
    if on_missing is OnMissingMask.SUPERPIXELS:
        return None
    raise RejectError(reason, f"{detail}. Samples without a usable mask are rejected in a shard that has masks; "
                              "pass --on-missing-mask superpixels to cut them into unlabelled superpixels instead")


def _decode_mask(
    members: dict[str, bytes], kind: MaskKind | None, config: IngestConfig, size: tuple[int, int]
) -> tuple[np.ndarray | None, list[dict[str, Any]] | None]:
    """(mask, annotations) of the given kind; (None, None) for a sample without a mask."""
    if kind is None:
        return None, None
    if kind is MaskKind.RLE:
        return None, _decode_annotations(members[config.rle_key], config.rle_key)
    return _decode_mask_png(members[config.mask_key], config.mask_key, size), None


def _decode_annotations(data: bytes, member: str) -> list[dict[str, Any]]:
    """The parsed rle.json: a list of annotation objects (checked in depth by the segments stage)."""
    annotations = _parse_json(data, member, RejectReason.BAD_ANNOTATION)
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise RejectError(RejectReason.BAD_ANNOTATION, f"{member} must be a JSON list of annotation objects")
    return annotations


# Single-channel modes; "P" keeps palette indices (PASCAL VOC class masks are palette PNGs).
_MASK_MODES = frozenset({"1", "L", "P"}) | _SIXTEEN_BIT_MODES


def _decode_mask_png(data: bytes, member: str, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 or uint16 raw mask values; single channel and the image's size, else a reject."""
    mask = _open_image(data, member, RejectReason.UNDECODABLE_MASK)
    if mask.mode not in _MASK_MODES:
        raise RejectError(
            RejectReason.UNDECODABLE_MASK,
            f"{member} has mode {mask.mode}; a mask must be single-channel (8- or 16-bit grey, or palette)",
        )
    height, width = size
    if mask.size != (width, height):
        raise RejectError(
            RejectReason.MASK_SIZE_MISMATCH,
            f"{member} is {mask.size[0]}x{mask.size[1]} but the image is {width}x{height} (W x H)",
        )
    _load(mask, member, RejectReason.UNDECODABLE_MASK)
    values = np.asarray(mask)
    if values.dtype.itemsize == 1:  # L, P, and "1" (bool)
        return values.astype(np.uint8)
    if values.min() < 0 or values.max() > 65535:
        raise RejectError(RejectReason.UNDECODABLE_MASK, f"{member} has values outside 0..65535")
    return values.astype(np.uint16)
