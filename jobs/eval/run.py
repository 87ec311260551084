"""`evaluate`: score banks on a labelled held-out corpus, every row in one pass over the images.

Rows: one per bank with the base options, one per ablation (on the first bank), and with `oracle` one per bank
with ground-truth regions labelled by the nearest prototype, plus one per region preset in use where each region
takes its majority true class. Each image is decoded once and cut into regions once per preset (one encoder
call per window); every row scores those regions (the banks share one encoder, so regions do not depend on the
bank).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bank_builder.config import IngestConfig
from bank_builder.encoders import Encoder, load_encoder
from bank_builder.format import BankNotIndexedError
from bank_builder.ingest import iter_samples, list_shards
from bank_builder.records import Reject, Sample
from jobs.eval.config import EvalConfig, Variant
from jobs.eval.metrics import BinaryScores, Confusion, ReferenceScores
from jobs.eval.reference import ReferencePool, score_trials, trial_classes
from jobs.eval.scoring import (
    ceiling_labels, embedder, foreground_map, fold_shares, open_set_labels, oracle_labels, truth_regions,
    vocabulary_labels,
)
from jobs.eval.truth import TruthError, class_truth, corpus_classes, foreground_truth, reduce_zero_label, truth_segments
from query.bank import Bank, open_bank
from query.class_text import ClassText
from query.corruption import PartReader
from query.prototypes import class_labels
from query.regions import Regions, region_preset
from query.search import BankSearcher
from query.segment import ForegroundConfig, OpenSetConfig, Segmenter, VocabularyConfig
from query.serving import encoder_config, label_table
from query.windows import WindowConfig, resize_short_side, window_regions


@dataclass
class EvalReport:
    """What `evaluate` measured. rows: {name, kind (bank / ablation / oracle / ceiling), bank, options, modes:
    {mode: metrics}}; encoder: its spec (name, weights, untrained, note); banks: uri, version, segments, labels;
    heldout: the shard pattern, images scored, rejects, classes; seconds: wall time; plots: files written."""

    encoder: dict[str, Any]
    banks: list[dict[str, Any]]
    heldout: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    seconds: float
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any]:
        """The row called `name`; KeyError listing the rows."""
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(f"no row {name!r}; rows: {[r['name'] for r in self.rows]}")

    def oracle_ratio(self, name: str = "base", mode: str = "vocabulary") -> float | None:
        """A bank row's mIoU over its bank's oracle row's (None without an oracle row or a score)."""
        row = self.row(name)
        oracle = [r for r in self.rows if r["kind"] == "oracle" and r["bank"] == row["bank"] and mode in r["modes"]]
        if not oracle or mode not in row["modes"]:
            return None
        mine, best = row["modes"][mode]["miou"], oracle[0]["modes"][mode]["miou"]
        return mine / best if mine is not None and best else None


def save_report(report: EvalReport, out: Path) -> None:
    """Write `out`/report.json and the plots (jobs.eval.plots; without matplotlib a note says so instead)."""
    from jobs.eval.plots import PlotsUnavailable, write_plots

    out.mkdir(parents=True, exist_ok=True)
    try:
        report.plots = write_plots(report, out)
    except PlotsUnavailable as exc:
        report.notes.append(str(exc))
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1) + "\n")


@dataclass(eq=False)
class _Row:
    """One row's plan and accumulators."""

    name: str
    kind: str
    bank: int | None
    variant: Variant | None
    modes: tuple[str, ...]
    scores: dict[str, Any] = field(default_factory=dict)
    prototypes: list[np.ndarray] | None = None
    references: dict | None = None
    match: dict[str, str] | None = None  # open set: bank label → class (None: exact names)


@dataclass(eq=False)
class _Opened:
    """A bank ready to query."""

    bank: Bank
    searcher: BankSearcher
    reads: PartReader
    table: Any


def evaluate(config: EvalConfig) -> EvalReport:
    """Run the evaluation `config` describes (see EvalConfig); ValueError / BankMismatchError naming the fix for
    bad options, a bank that cannot be queried, or a corpus that cannot be scored as asked."""
    started = time.perf_counter()
    run = _Run(config)
    report = run.score()
    report.seconds = round(time.perf_counter() - started, 3)
    return report


class _Run:
    """State of one evaluation: the encoder, the banks, the rows, the reference pool."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        first = open_bank(config.banks[0], storage_options=config.storage_options)
        self.encoder: Encoder = load_encoder(encoder_config(first.manifest.encoder, config.weights, config.device))
        self.class_text = ClassText(self.encoder)  # shared by every bank and preset
        self.opened = [self._open(uri) for uri in config.banks]
        self.segmenters: dict[tuple[int, str], Segmenter] = {}

    def _open(self, uri: str) -> _Opened:
        bank = open_bank(uri, storage_options=self.config.storage_options, expected_encoder=self.encoder.spec)
        if bank.index is None:
            raise BankNotIndexedError(f"bank {uri} version {bank.version} has no index; run `refbank index {uri}`")
        return _Opened(bank, BankSearcher(bank), PartReader(bank), label_table(bank))

    def segmenter(self, bank: int, regions: str) -> Segmenter:
        """The Segmenter of a bank with a region preset (made once)."""
        key = (bank, regions)
        if key not in self.segmenters:
            o = self.opened[key[0]]
            self.segmenters[key] = Segmenter(self.encoder, o.searcher, o.reads, o.table,
                                             region_preset(regions, self.config.protocol.working_side),
                                             vectors=o.bank, class_text=self.class_text)
        return self.segmenters[key]

    # ------------------------------------------------------------------------------------- planning

    def plan(self, classes: list[str]) -> list[_Row]:
        """The rows, their accumulators, and their prototypes."""
        c = self.config
        names = _bank_names(c.banks)
        rows = [_Row(names[b], "bank", b, c.base, c.modes) for b in range(len(c.banks))]
        rows += [_Row(v.name, "ablation", 0, v, c.modes) for v in c.ablations]
        pixel_modes = tuple(m for m in c.modes if m in ("vocabulary", "open_set"))
        if c.oracle and pixel_modes:
            rows += [_Row(f"oracle:{names[b]}" if len(c.banks) > 1 else "oracle", "oracle", b, c.base, pixel_modes)
                     for b in range(len(c.banks))]
            presets = dict.fromkeys(v.regions for v in c.variants())
            rows += [_Row(f"ceiling:{p}", "ceiling", None, None, ("vocabulary",)) for p in presets]
        for row in rows:
            row.scores = {m: self._accumulator(m, classes) for m in row.modes}
            if row.bank is not None and "vocabulary" in row.modes:
                row.prototypes, _ = self.segmenter(row.bank, row.variant.regions).class_prototypes(
                    classes, _vocabulary(row.variant))
            if row.bank is not None and "open_set" in row.modes:
                row.match = self._open_set_match(row, classes)
        return rows

    def _open_set_match(self, row: _Row, classes: list[str]) -> dict[str, str] | None:
        """{bank label: class} by text for the row's bank (EvalConfig.open_set_match), or None (exact names)."""
        table = self.opened[row.bank].table
        if self.config.open_set_match == "exact" or self.encoder.spec.text_dim is None or not table.labels:
            return None
        text = self.segmenter(row.bank, row.variant.regions).text_embeddings(classes)
        return class_labels(table, text, classes, _vocabulary(row.variant))

    def _open_set(self, row: _Row) -> OpenSetConfig:
        """The open-set options of a row: its k, the run's rule for unlabelled neighbours."""
        return OpenSetConfig(k=row.variant.k, unlabelled=self.config.open_set_unlabelled)

    def _accumulator(self, mode: str, classes: list[str]) -> Any:
        if mode in ("vocabulary", "open_set"):
            return Confusion(classes)
        return BinaryScores(self.config.f_beta2) if mode == "foreground" else ReferenceScores()

    # ------------------------------------------------------------------------------------- the pass

    def score(self) -> EvalReport:
        c = self.config
        samples, rejects = self._samples()
        first = next(samples, None)
        if first is None:
            raise ValueError(f"{c.heldout} holds no usable sample ({rejects['count']} rejected); check the pattern "
                             "and --mask-kind")
        samples = itertools.chain([first], samples)
        classes = self._classes(first)
        background = classes.index(c.protocol.background_class) if c.protocol.background_class else None
        rows = self.plan(classes)
        pool, samples = self._reference_pool(samples, classes)
        for row in rows:
            if "reference" in row.modes:
                row.references = pool.prepare(self.segmenter(row.bank, row.variant.regions),
                                              c.reference.query(row.variant.k))
        images = 0
        for index, sample in enumerate(samples):
            self._score_image(index, sample, classes, rows, pool, background)
            images += 1
        return EvalReport(
            encoder={k: self.encoder.spec.to_dict().get(k) for k in ("name", "weights", "untrained", "note")},
            banks=[{"uri": o.bank.uri, "version": o.bank.version, "segments": o.bank.manifest.totals.get("segments"),
                    "labels": len(o.table.labels)} for o in self.opened],
            heldout={"shards": c.heldout, "shard_count": len(self.shards), "images": images, "rejects": rejects, "classes": classes},
            config=_config_dict(c), rows=[_summary(row) for row in rows], seconds=0.0)

    def _samples(self) -> tuple[Iterator[Sample], dict[str, Any]]:
        """The held-out samples (first max_images), and a live count of rejects by reason."""
        rejects: dict[str, Any] = {"count": 0, "by_reason": {}}

        shards = self.shards = list_shards(self.config.heldout, self.config.storage_options)
        ingest = IngestConfig(mask_kind=self.config.mask_kind)

        def usable() -> Iterator[Sample]:
            items = itertools.chain.from_iterable(iter_samples(s, ingest, self.config.storage_options) for s in shards)
            for item in items:
                if isinstance(item, Reject):
                    rejects["count"] += 1
                    rejects["by_reason"][item.reason.value] = rejects["by_reason"].get(item.reason.value, 0) + 1
                    continue
                if self.config.protocol.reduce_zero_label:
                    item = reduce_zero_label(item, self.config.protocol.ignore_index)
                yield item

        return itertools.islice(usable(), self.config.max_images), rejects

    def _classes(self, first: Sample) -> list[str]:
        """The scored class list: the config's, the corpus's class table, else the first bank's labels."""
        c = self.config
        classes = list(c.classes) if c.classes else corpus_classes(first) or list(self.opened[0].table.labels)
        if not classes:
            raise ValueError("no class list: the corpus has no json `classes` and the bank no labels; give --classes")
        if c.protocol.background_class is not None and c.protocol.background_class not in classes:
            raise ValueError(f"background class {c.protocol.background_class!r} is not one of the classes")
        return classes

    def _reference_pool(self, samples: Iterator[Sample], classes: list[str]) -> tuple[ReferencePool, Iterator[Sample]]:
        """The reference pool from the first pool_images samples (kept, then scored like the others)."""
        pool = ReferencePool(self.config.reference, classes)
        if "reference" not in self.config.modes:
            return pool, samples
        head = list(itertools.islice(samples, self.config.reference.pool_images))
        for sample in head:
            truth = class_truth(truth_segments(sample, self.config.protocol.ignore_index), sample.image.shape[:2],
                                classes)
            pool.offer(sample.key, sample.image, truth)
        return pool, itertools.chain(head, samples)

    def _score_image(self, index: int, sample: Sample, classes: list[str], rows: list[_Row], pool: ReferencePool,
                     background: int | None) -> None:
        c, protocol = self.config, self.config.protocol
        try:
            segments = truth_segments(sample, protocol.ignore_index)
        except TruthError as exc:
            raise ValueError(str(exc)) from None
        shape = sample.image.shape[:2]
        truth = class_truth(segments, shape, classes)
        image = resize_short_side(sample.image, protocol.windows.short_side)
        size = image.shape[:2]
        windows = _RegionCache(self, image, protocol.windows)
        fg_truth = None
        for row in rows:
            if row.kind == "ceiling":
                preset = row.name.split(":", 1)[1]
                row.scores["vocabulary"].add(truth, ceiling_labels(windows.get(preset), size, truth, len(classes)))
                continue
            segmenter = self.segmenter(row.bank, row.variant.regions)
            if row.kind == "oracle":
                self._oracle(row, segmenter, sample, segments, classes, truth)
                continue
            regions = windows.get(row.variant.regions)
            for mode in row.modes:
                if mode == "vocabulary":
                    labels = vocabulary_labels(segmenter, regions, size, row.prototypes, shape,
                                               protocol.background_threshold, background)
                    row.scores[mode].add(truth, labels)
                elif mode == "open_set":
                    labels = open_set_labels(segmenter, regions, size, classes, self._open_set(row), shape,
                                             row.match)
                    row.scores[mode].add(truth, labels)
                elif mode == "foreground":
                    config = ForegroundConfig(threshold=c.foreground_threshold, k=row.variant.k)
                    if fg_truth is None:
                        fg_truth = foreground_truth(sample, segments, config.background_labels)
                    row.scores[mode].add(fg_truth, foreground_map(segmenter, regions, size, config, shape),
                                         c.foreground_threshold)
                else:
                    trials = trial_classes(sample.key, truth, pool, index)
                    score_trials(segmenter, windows.whole(row.variant.regions), row.references, trials, truth,
                                 c.reference.query(row.variant.k), row.scores[mode])

    def _oracle(self, row: _Row, segmenter: Segmenter, sample: Sample, segments: list, classes: list[str],
                truth: np.ndarray) -> None:
        """Ground-truth regions (pooled on the original image) labelled by the row's bank."""
        made = truth_regions(sample.image, segments, classes, embedder(segmenter))
        if made is None:
            for mode in row.modes:
                row.scores[mode].add(truth, np.full(truth.shape, -1, np.int64))
            return
        regions, _ = made
        shape = truth.shape
        if "vocabulary" in row.modes:
            scores = segmenter.vocabulary_scores(regions, row.prototypes)
            row.scores["vocabulary"].add(truth, oracle_labels(scores, regions, shape))
        if "open_set" in row.modes:
            config = self._open_set(row)
            shares = fold_shares(*segmenter.open_set_shares(regions, config), classes, row.match, config.unlabelled)
            row.scores["open_set"].add(truth, oracle_labels(shares, regions, shape, others=len(classes)))


class _RegionCache:
    """One image's regions per preset: over the protocol's windows, and over the whole image (reference mode)."""

    def __init__(self, run: _Run, image: np.ndarray, windows: WindowConfig) -> None:
        self.run, self.image, self.windows = run, image, windows
        self._windows: dict[str, list] = {}
        self._whole: dict[str, Regions] = {}

    def get(self, preset: str) -> list:
        if preset not in self._windows:
            self._windows[preset] = window_regions(self.image, self.run.segmenter(0, preset).regions, self.windows)
        return self._windows[preset]

    def whole(self, preset: str) -> Regions:
        if preset not in self._whole:
            windows = self.get(preset)
            single = len(windows) == 1 and windows[0][0] == (0, 0, *self.image.shape[:2])
            self._whole[preset] = windows[0][1] if single else self.run.segmenter(0, preset).regions(self.image)
        return self._whole[preset]


def _vocabulary(variant: Variant) -> VocabularyConfig:
    return VocabularyConfig(labels_per_class=variant.labels_per_class, prototypes_per_class=variant.prototypes,
                            prototype_neighbours=variant.prototype_neighbours)


def _bank_names(banks: tuple[str, ...]) -> list[str]:
    """Row names of the banks: "base" for one bank; else each URI's last path part (its position if they clash)."""
    if len(banks) == 1:
        return ["base"]
    names = [Path(b.rstrip("/")).name or b for b in banks]
    return names if len(set(names)) == len(names) else [f"bank{i}" for i in range(len(banks))]


def _summary(row: _Row) -> dict[str, Any]:
    options = None if row.variant is None else {k: v for k, v in asdict(row.variant).items() if k != "name"}
    summary = {"name": row.name, "kind": row.kind, "bank": row.bank, "options": options,
               "modes": {mode: acc.summary() for mode, acc in row.scores.items()}}
    if "open_set" in row.modes and row.bank is not None:  # which bank labels voted for each class
        summary["open_set_labels"] = {"match": "exact"} if row.match is None else {
            "match": "text", "by_class": {c: sorted(l for l, m in row.match.items() if m == c)
                                          for c in dict.fromkeys(row.match.values())}}
    return summary


def _config_dict(config: EvalConfig) -> dict[str, Any]:
    """The config as JSON-ready data, without storage options (they may hold secrets)."""
    data = asdict(config)
    data.pop("storage_options", None)
    data["mask_kind"] = config.mask_kind.value
    return data
