"""What the query service holds: the bank's encoder, loaded once, and the live bank version (bank, list cache +
searcher, segmenters) as one immutable `Snapshot` that a reload replaces atomically; plus decoding of uploaded
images under the service's limits, and storage errors turned into answers.

A request reads `state.live` once and works on that snapshot to the end, so a reload never changes a bank under
a running request: the new version is opened, its index loaded and its label table built off to the side, and
only then is the reference swapped; the old snapshot is freed when its last request finishes.

Which version: the configured one, else CURRENT; while CURRENT has no index yet (a build published it and
`refbank index` has not run), the newest indexed version before it, with a note saying so (`Snapshot.note`).
A damaged bank object met by a request (checksum mismatch, undecodable part, CURRENT naming no version) answers
503 `storage_corrupt` naming the object, is counted, and is kept on the snapshot for /readyz.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from bank_builder.config import EncoderConfig
from bank_builder.encoders import Encoder, load_encoder, resolve_spec
from bank_builder.format import (
    BankError,
    BankFormatError,
    BankMismatchError,
    BankNotIndexedError,
    BankRef,
    StorageError,
    current_version,
    list_versions,
    read_manifest,
)
from query.bank import Bank, open_bank
from query.class_text import ClassText
from query.corruption import PartReader, damaged_object
from query.disk_cache import DiskCache
from query.lists import DEFAULT_MEMORY_BYTES, CacheConfig
from query.prefetch import Prefetcher
from query.regions import REGION_PRESETS, region_preset
from query.search import MAX_K, BankSearcher
from query.segment import LabelTable, Segmenter

log = logging.getLogger("refbank.service")

# Cache counters that only grow (summed over every version served); the rest of ListCache.stats() are gauges.
CACHE_COUNTERS = ("hits", "misses", "fetch_requests", "bytes_fetched", "evictions", "compactions", "fetch_seconds")


@dataclass(frozen=True)
class ServiceConfig:
    """Options of the query service.

    bank: bank URI (any fsspec URL); version: the version to serve (None = CURRENT); storage_options: fsspec
    options of the bank; cache_dir: local disk tier of the list cache (None = none), holding at most disk_bytes;
    memory_bytes: the list cache's memory budget (a budget that holds the whole index never evicts); eviction:
    "2q" or "lru"; prefetch: after a version opens, fill the free budget in the background with the lists
    earlier runs probed most (access counts kept in cache_dir), else the largest. follow_seconds: when set, read
    CURRENT this often and switch to each newly published version (as /admin/reload does).
    weights: a local checkpoint path for the bank's encoder when its spec names
    pretrained weights (untrained banks always load seeded random weights, as built); device: "auto" / "cpu" /
    "cuda". Limits: max_upload_bytes (whole request body), max_json_bytes (a JSON body or `options` field),
    max_pixels (width × height) and max_aspect (long side / short side), both checked from the image header
    before decoding, max_k (search results, ≤ query.search.MAX_K), max_vocabulary (classes per request),
    max_references (reference prompts per request). working_side: query images are reduced to this long side
    before regions are made (RegionConfig.working_side). image_workers / image_queue: image requests (segment,
    image search) run at once / may wait; query_workers / query_queue: the same for text and vector searches and
    bank descriptions; a request beyond running + waiting is answered 429 with Retry-After (query.admission).
    token: when set, /v1/* and /admin/* need `Authorization: Bearer <token>`.
    """

    bank: str
    version: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    disk_bytes: int = 4 << 30
    prefetch: bool = False
    follow_seconds: float | None = None
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    eviction: str = "2q"
    weights: str | None = None
    device: str = "auto"
    max_upload_bytes: int = 16 << 20
    max_json_bytes: int = 1 << 20
    max_pixels: int = 4096 * 4096
    max_aspect: float = 20.0
    max_k: int = 256
    max_vocabulary: int = 64
    max_references: int = 8
    working_side: int = 256
    image_workers: int = 1
    image_queue: int = 4
    query_workers: int = 2
    query_queue: int = 32
    token: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_k <= MAX_K:
            raise ValueError(f"max_k must be between 1 and {MAX_K} (query.search.MAX_K), got {self.max_k}")
        for name in ("max_upload_bytes", "max_json_bytes", "max_pixels", "max_vocabulary", "max_references",
                     "working_side", "image_workers", "query_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_queue < 0 or self.query_queue < 0:
            raise ValueError("image_queue and query_queue must be >= 0")
        if not self.max_aspect >= 1:  # NaN fails too
            raise ValueError(f"max_aspect must be >= 1 (long side / short side), got {self.max_aspect}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be blank; leave it None to serve without authentication")


class ApiError(Exception):
    """An error answered as JSON {"error": code, "detail": detail, **extra} with an HTTP status (and headers)."""

    def __init__(self, status: int, code: str, detail: Any, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(f"{code}: {detail}")
        self.status, self.code, self.detail, self.extra, self.headers = status, code, detail, extra, headers


class NotReady(ApiError):
    def __init__(self, detail: str) -> None:
        super().__init__(503, "not_ready", detail)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One loaded bank version: everything a request needs; nothing in it changes once built but the `corrupt`
    record. note: why this is not the version asked for (CURRENT without an index); corrupt: damaged objects its
    requests met (object → what was wrong), kept for /readyz until a reload."""

    bank: Bank
    reads: PartReader
    searcher: BankSearcher
    table: LabelTable
    segmenters: dict[str, Segmenter]  # region preset name → Segmenter
    loaded_at: float
    note: str | None = None
    corrupt: dict[str, str] = field(default_factory=dict)
    prefetcher: Prefetcher | None = None  # warms the list cache; keeps access counts beside the disk cache


class SerialEncoder(Encoder):
    """The service's encoder, shared by concurrent requests: forward passes run one at a time (each uses every
    core already), while regions, pooling, search and rendering run in parallel outside the lock."""

    def __init__(self, inner: Encoder) -> None:
        self.inner, self.spec, self.device = inner, inner.spec, inner.device
        self._lock = threading.Lock()

    def encode_dense(self, images: np.ndarray) -> torch.Tensor:
        """The inner encoder's encode_dense, under the lock."""
        with self._lock:
            return self.inner.encode_dense(images)

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """The inner encoder's encode_text, under the lock."""
        with self._lock:
            return self.inner.encode_text(texts)


def servable_version(ref: BankRef, wanted: str | None) -> tuple[str | None, str | None]:
    """(version to serve, note): `wanted` when given; else CURRENT if it has an index, else the newest version
    before CURRENT that has one, with a note saying why (BankNotIndexedError when none has). (None, None) for a
    bank without CURRENT (open_bank says so)."""
    if wanted is not None:
        return wanted, None
    current = current_version(ref)
    if current is None or read_manifest(ref, current).index is not None:
        return current, None
    for version in sorted((v for v in list_versions(ref) if v < current), reverse=True):
        if read_manifest(ref, version).index is not None:
            return version, (f"CURRENT is {current}, which has no index yet (run `refbank index {ref}`); serving "
                             f"{version}, the newest version with an index")
    raise BankNotIndexedError(f"bank {ref}: CURRENT {current} has no index and no earlier version has one; run "
                              f"`refbank index {ref}` first")


def label_table(bank: Bank) -> LabelTable:
    """The bank's label table (labels, text (L, D), prototypes (L, C), counts (L,)): its text index, which the
    index build writes with each label's mean visual embedding. A bank without labels gets an empty table."""
    try:
        return bank.label_table()
    except BankMismatchError:
        return SimpleNamespace(labels=[], text=np.zeros((0, bank.dims["text"] or 1), np.float32),
                               prototypes=np.zeros((0, bank.dims["visual"]), np.float32), counts=np.zeros(0, np.int64))


def encoder_config(spec: dict[str, Any], weights: str | None = None, device: str = "auto") -> EncoderConfig:
    """How to load the encoder a bank's manifest records, from the registry entry it records (banks built before
    entries were recorded: the registry's entry by name): seeded untrained weights as built; else `weights` (a
    checkpoint path) when given, the entry's pretrained weights when they are the ones recorded, or the recorded
    weights as a checkpoint path."""
    name, entry = spec["name"], spec.get("entry")
    if spec.get("untrained"):
        return EncoderConfig(name=name, weights="untrained", seed=int(spec.get("seed") or 0), device=device,
                             entry=entry)
    if weights is not None:
        return EncoderConfig(name=name, weights=weights, device=device, entry=entry)
    try:
        pretrained = resolve_spec(EncoderConfig(name=name, weights="pretrained", entry=entry)).weights
    except Exception:  # no pretrained tag in the entry: the bank was built from a checkpoint
        pretrained = None
    return EncoderConfig(name=name, weights="pretrained" if pretrained == spec["weights"] else spec["weights"],
                         device=device, entry=entry)


class ServiceState:
    """The encoder and the live Snapshot of a running service (thread-safe)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.encoder: SerialEncoder | None = None
        self.class_text: ClassText | None = None  # one per encoder: every preset and version shares it
        self.error: str | None = None  # why the first load failed
        self._live: Snapshot | None = None
        self._reload_lock = threading.Lock()
        self._retired: Counter[str] = Counter()  # cache counters of versions no longer served
        self.disk = DiskCache(config.cache_dir, config.disk_bytes) if config.cache_dir else None
        self._stop_following = threading.Event()
        self.reloads: Counter[str] = Counter()
        self.corruptions: Counter[str] = Counter()  # damaged objects met, by name ("unknown": not named)

    @property
    def live(self) -> Snapshot:
        """The snapshot to serve this request from; NotReady (503) before the first load."""
        snapshot = self._live
        if snapshot is None:
            raise NotReady(f"the bank is not loaded: {self.error}" if self.error else "the bank is still loading")
        return snapshot

    @property
    def ready(self) -> bool:
        return self._live is not None

    def load(self) -> Snapshot:
        """First load: the bank's encoder (from its manifest) and the configured version. Raises on failure."""
        with self._reload_lock:
            if self._live is not None:
                return self._live
            try:
                start = time.perf_counter()
                version, note = servable_version(self.ref, self.config.version)
                recorded = open_bank(self.ref, version)
                if recorded.manifest.index is None:  # before the encoder loads: seconds, and its log lines
                    raise BankNotIndexedError(f"bank {self.config.bank} version {recorded.version} has no index; run "
                                              f"`refbank index {self.config.bank}`, or serve a version that has one")
                self.encoder = SerialEncoder(load_encoder(encoder_config(recorded.manifest.encoder,
                                                                         self.config.weights, self.config.device)))
                self.class_text = ClassText(self.encoder)
                self._live = self._open(recorded.version, note)
                log.info("serving %s %s (%d segments) with encoder %s%s in %.1f s%s", self.config.bank,
                         self._live.bank.version, self._live.bank.manifest.totals["segments"],
                         self.encoder.spec.name, " (UNTRAINED weights)" if self.encoder.spec.untrained else "",
                         time.perf_counter() - start, f"; {note}" if note else "")
                self.error = None
                return self._live
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                raise

    def reload(self, version: str | None = None) -> tuple[str, str, str | None]:
        """Serve `version` (None = the bank's CURRENT now, or while CURRENT has no index the newest version that
        has one): built off to the side, then swapped in one assignment; requests already running finish on the
        old version. Returns (previous version, new version, note: why the new one is not CURRENT). When CURRENT
        has no index and the newest indexed version is the one served, it is kept as it is (no reopening).
        ApiError 404 for a version the bank does not have, 409 when it cannot be served with this encoder, 503
        storage_corrupt when a bank object it needs is damaged."""
        if not self.ready:
            raise NotReady("the bank is not loaded yet, so there is no version to switch from")
        ref = self.ref
        with self._reload_lock, self.reading(None):
            available = list_versions(ref)
            if version is not None and version not in available:
                self.reloads["unknown_version"] += 1
                raise ApiError(404, "unknown_version", f"bank {self.config.bank} has no version {version!r}",
                               available=available)
            old = self._live
            try:
                version, note = servable_version(ref, version)
                if note and version == old.bank.version:
                    self.reloads["kept"] += 1
                    log.info("kept %s: %s", version, note)
                    return version, version, note
                fresh = self._open(version, note)
            except (BankFormatError, StorageError):
                raise  # a damaged object or a failing store: 503 (self.reading), not the caller's fault
            except (BankError, ValueError) as exc:
                self.reloads["refused"] += 1
                raise ApiError(409, "bank_mismatch", str(exc)) from None
            self._retired.update({k: v for k, v in old.searcher.stats().items() if k in CACHE_COUNTERS})
            self._live = fresh  # the swap: one reference assignment
            if old.prefetcher is not None:
                old.prefetcher.stop()
            self.reloads["ok"] += 1
        log.info("switched from %s to %s%s", old.bank.version, fresh.bank.version, f" ({note})" if note else "")
        return old.bank.version, fresh.bank.version, note

    @contextmanager
    def reading(self, snapshot: Snapshot | None) -> Iterator[None]:
        """Storage failures of the work inside as answers (`storage_error`), damage kept on `snapshot`."""
        try:
            yield
        except (BankFormatError, StorageError, OSError) as exc:
            raise self.storage_error(exc, snapshot) from None

    def storage_error(self, exc: BankFormatError | StorageError | OSError,
                      snapshot: Snapshot | None = None) -> ApiError:
        """The answer to a storage failure: a damaged object (BankFormatError) → 503 storage_corrupt naming it,
        counted, and kept on `snapshot` for /readyz; a store that cannot be reached or kept failing through its
        retries (StorageError, OSError) → 503 storage_unavailable with Retry-After."""
        if isinstance(exc, BankFormatError):
            name = damaged_object(exc, self.ref, snapshot.bank.index if snapshot else None)
            self.corruptions[name or "unknown"] += 1
            if snapshot is not None:
                snapshot.corrupt[name or "unknown"] = str(exc)
            log.error("storage_corrupt: %s", exc)
            return ApiError(503, "storage_corrupt", str(exc), object=name)
        log.error("storage_unavailable: %s: %s", type(exc).__name__, exc)
        if isinstance(exc, StorageError):
            return ApiError(503, "storage_unavailable", f"reading bank {self.config.bank} failed: {exc}",
                            headers={"Retry-After": "1"}, object=exc.url)
        return ApiError(503, "storage_unavailable", f"reading bank {self.config.bank} failed ({type(exc).__name__}: "
                                                    f"{exc}); retry", headers={"Retry-After": "1"})

    @property
    def ref(self) -> BankRef:
        """The served bank."""
        return BankRef(self.config.bank, self.config.storage_options)

    def cache_stats(self) -> dict[str, float]:
        """List-cache counters summed over every version served, and the live cache's gauges."""
        snapshot = self._live
        stats: dict[str, float] = dict.fromkeys(CACHE_COUNTERS, 0)
        stats.update(self._retired)
        if snapshot is not None:
            for key, value in snapshot.searcher.stats().items():
                stats[key] = stats.get(key, 0) + value if key in CACHE_COUNTERS else value
        return stats

    def _open(self, version: str, note: str | None = None) -> Snapshot:
        """Open `version` checked against the loaded encoder, with its own list cache and searcher."""
        assert self.encoder is not None
        config = self.config
        bank = open_bank(self.ref, version, expected_encoder=self.encoder.spec)
        reads = PartReader(bank)
        searcher = BankSearcher(bank, CacheConfig(memory_bytes=config.memory_bytes, policy=config.eviction),
                                disk=self.disk)
        table = label_table(bank)
        segmenters = {name: Segmenter(self.encoder, searcher, reads, table, region_preset(name, config.working_side),
                                      class_text=self.class_text) for name in REGION_PRESETS}
        prefetcher = None
        if config.prefetch or config.cache_dir:
            heat = Path(config.cache_dir) / f"heat-{bank.index.id}.npy" if config.cache_dir else None
            prefetcher = Prefetcher(searcher.cache, heat)
            if config.prefetch:
                prefetcher.start()
        return Snapshot(bank, reads, searcher, table, segmenters, time.time(), note, prefetcher=prefetcher)

    def close(self) -> None:
        """Stop following CURRENT and prefetching; keep the list access counts (at shutdown)."""
        self._stop_following.set()
        snapshot = self._live
        if snapshot is not None and snapshot.prefetcher is not None:
            snapshot.prefetcher.stop()

    def follow(self, poll_s: float) -> threading.Thread:
        """Read CURRENT every `poll_s` seconds and switch to each newly servable version (CURRENT once it has an
        index), off to the side: requests keep being served by the old one until the swap. A version that cannot
        be served is logged and skipped until CURRENT moves again."""

        def watch() -> None:
            skipped = None
            while not self._stop_following.wait(poll_s):
                target = None
                try:
                    target, _ = servable_version(self.ref, None)
                    live = self._live
                    if live is None or target in (None, skipped, live.bank.version):
                        continue
                    previous, version, _ = self.reload(target)
                    self.reloads["followed"] += 1
                    log.info("followed CURRENT from %s to %s", previous, version)
                except Exception as exc:  # a bad version must not stop the watch: the next publish may be fine
                    skipped = target
                    log.warning("cannot switch to the bank's servable version %s: %s", skipped, exc)

        thread = threading.Thread(target=watch, name="refbank-follow", daemon=True)
        thread.start()
        return thread


# ----------------------------------------------------------------------------------------- uploads


def decode_image(data: bytes, max_pixels: int, what: str = "image", max_aspect: float = 20.0) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an uploaded image file (EXIF orientation applied). ApiError 400 when it is not an
    image or cannot be decoded (truncated, corrupt); 413 when its header claims more than max_pixels pixels, 422
    when its long side is more than max_aspect times its short side — both checked before any pixel is decoded,
    so a small file cannot make the server allocate a huge image or cut a 1-pixel-wide strip into regions."""
    image = _open_image(data, what)
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"{what} is {width}x{height} = {width * height} pixels; this server "
                                               f"takes at most {max_pixels}. Downscale it first.")
    if max(width, height) > max_aspect * max(1, min(width, height)):
        raise ApiError(422, "invalid_image_shape", f"{what} is {width}x{height} (W x H); this server takes images "
                                                   f"whose long side is at most {max_aspect:g} times the short side. "
                                                   "Crop it first.")
    try:
        image.load()
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... on bad data
        raise ApiError(400, "invalid_image", f"{what} could not be decoded ({exc}); it may be truncated or "
                                             "corrupt") from None


def decode_mask(data: bytes, shape: tuple[int, int], max_pixels: int, what: str = "mask") -> np.ndarray:
    """(H, W) bool of an uploaded mask image (non-zero pixels in any channel = the object), which must have the
    `shape` (H, W) of its reference image. ApiError as in decode_image; 400 for a size mismatch."""
    image = _open_image(data, what)
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large", f"{what} is {width}x{height}; at most {max_pixels} pixels")
    if (height, width) != tuple(shape):
        raise ApiError(400, "invalid_mask", f"{what} is {width}x{height} (W x H); its reference image is "
                                            f"{shape[1]}x{shape[0]}: give the mask at the image's size")
    try:
        image.load()
        array = np.asarray(image)
    except Exception as exc:
        raise ApiError(400, "invalid_image", f"{what} could not be decoded ({exc})") from None
    return array.any(axis=2) if array.ndim == 3 else array != 0


def _open_image(data: bytes, what: str) -> Image.Image:
    if not data:
        raise ApiError(400, "invalid_image", f"{what} is empty")
    try:
        return Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:  # PIL's own guard (2 × Image.MAX_IMAGE_PIXELS) fired first
        raise ApiError(413, "image_too_large", f"{what}: {exc}") from None
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", f"{what} is not an image this server can read (PNG, JPEG, WebP, "
                                             "BMP, TIFF, GIF)") from None
    except Exception as exc:
        raise ApiError(400, "invalid_image", f"{what} could not be read ({exc}); it may be truncated or "
                                             "corrupt") from None
