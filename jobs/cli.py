"""The `refbank` command line: a thin layer over the library's jobs."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from bank_builder.config import (
    MASK_PROBE_SAMPLES, BuildConfig, EncoderConfig, IngestConfig, MaskKind, OnMissingMask, PipelineConfig, SegmentConfig,
)
from bank_builder.index.params import IndexConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Build reference banks of segment embeddings from WebDataset image+mask corpora, and serve them.",
)

# Options several commands share, declared once.
STORAGE_OPTION = typer.Option(None, help="fsspec storage option KEY=VALUE for s3:// URLs (repeatable), "
                              "e.g. endpoint_url=http://127.0.0.1:9000.")
ENDPOINT_URL = typer.Option(None, envvar="REFBANK_S3_ENDPOINT", help="S3 endpoint URL.")
RAY_ADDRESS = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray.")
AS_JSON = typer.Option(False, "--json", help="Print the report as JSON.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Log stage details.")


def _storage_options(items: list[str] | None, endpoint_url: str | None) -> dict[str, str]:
    """Parse repeated KEY=VALUE options into an fsspec storage-options dict."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--storage-option")
        options[key] = value
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return options


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("make-corpus")
def make_corpus_cmd(
    out: str = typer.Argument(..., help="Where to write the shards: a local directory or s3://bucket/prefix."),
    shards: int = typer.Option(4, help="Number of training shards."),
    samples_per_shard: int = typer.Option(32, help="Samples (images) per shard."),
    image_size: int = typer.Option(256, help="Image side in pixels (square images)."),
    mask_kind: MaskKind = typer.Option(MaskKind.INSTANCE, help="Mask format written with each image."),
    image_format: str = typer.Option("jpg", help="Image encoding: jpg or png."),
    heldout_shards: int = typer.Option(0, help="Extra held-out shards (heldout-*.tar) for evaluation."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes byte-identical shards."),
    captions: bool = typer.Option(False, "--captions", help="Write noisy captions: varied phrases per class, with "
                                  "the wrong / missing rates below; the truth goes in the json's caption_truth."),
    wrong_phrase_rate: float = typer.Option(0.0, help="With --captions: chance that a phrase names a class absent "
                                            "from the image instead of the one present."),
    missing_phrase_rate: float = typer.Option(0.0, help="With --captions: chance that a class present is not named."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
) -> None:
    """Write a synthetic, seeded WebDataset image+mask corpus (scenes cut from scikit-image's photos)."""
    from bank_builder.synthetic import CorpusConfig, make_corpus

    config = CorpusConfig(shards=shards, samples_per_shard=samples_per_shard, image_size=image_size,
                          mask_kind=mask_kind, image_format=image_format, heldout_shards=heldout_shards, seed=seed,
                          captions=captions, wrong_phrase_rate=wrong_phrase_rate,
                          missing_phrase_rate=missing_phrase_rate)
    try:
        summary = make_corpus(out, config, _storage_options(storage_option, endpoint_url))
    except ValueError as exc:  # e.g. --mask-kind auto, which reads corpora but writes none
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {len(summary.shards)} shards + {len(summary.heldout)} held-out, {summary.samples} samples, "
               f"{summary.segments} segments to {out}")


@app.command("convert")
def convert_cmd(
    dataset: str = typer.Argument(..., help="Dataset layout: ade20k, coco-stuff, voc, pascal-context (59 classes) "
                                  "or pascal-context-60."),
    root: Path = typer.Argument(..., help="The dataset folder, e.g. ADEChallengeData2016, coco_stuff164k, "
                                "VOCdevkit/VOC2012, VOCdevkit/VOC2010."),
    out: str = typer.Argument(..., help="Where to write the shards: a local directory or s3://bucket/prefix."),
    split: str = typer.Option(..., help="The dataset's name of the split to convert (validation, val2017, val...)."),
    samples_per_shard: int = typer.Option(1000, help="Images per tar shard."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
) -> None:
    """Convert a segmentation dataset's released layout into refbank's corpus shards (image + class mask + json).

    Build a bank from them with `refbank build '<out>/*.tar' <bank> --mask-kind class`. Images without a usable
    mask are skipped and counted. Exit status: 0 ok, 2 bad options or layout.
    """
    from bank_builder.convert import ConvertConfig, convert

    try:
        report = convert(root, out, ConvertConfig(dataset=dataset, split=split, samples_per_shard=samples_per_shard),
                         _storage_options(storage_option, endpoint_url))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    skipped = ", ".join(f"{n} {reason} (e.g. {report.examples[reason]})" for reason, n in report.skipped.items())
    typer.echo(f"wrote {len(report.shards)} shards, {report.samples} samples of {report.dataset} {report.split} "
               f"({report.classes} classes) to {out}" + (f"; skipped {skipped}" if skipped else ""))


@app.command("fit-encoder")
def fit_encoder_cmd(
    out: Path = typer.Argument(..., help="Checkpoint to write (.safetensors); its report goes next to it (.json)."),
    encoder: str = typer.Option("synthetic-clip", help="open_clip registry entry to fit (see `refbank encoders`)."),
    weights: str = typer.Option("untrained", help="Starting weights: 'untrained' (seeded), 'pretrained' or a "
                                "checkpoint path."),
    seed: int = typer.Option(0, help="Seed of untrained starting weights, batch order, flips and text variants."),
    train_images: int = typer.Option(1536, help="Generated training images (multiple of 64)."),
    steps: int = typer.Option(1000, help="Optimiser steps."),
    batch_images: int = typer.Option(32, help="Images per step."),
    threads: int = typer.Option(1, help="torch CPU threads. 1 is the default because on a shared machine two "
                                "threads per process ran several times slower (see docs/ENCODER_FIT.md)."),
    as_json: bool = AS_JSON,
) -> None:
    """Fit an open_clip encoder on generated scenes (contrastive: mask-pooled segments vs label / phrase text).

    The result is a STAND-IN for this project's generated data, not a model for real images. The package ships
    one (`synthetic-clip`, used by `refbank demo`); this command reproduces it from its seeds.
    """
    from bank_builder.encoders import EncoderWeightsError
    from bank_builder.encoders.fit import FitConfig, fit_encoder

    _setup_logging(False)
    defaults = FitConfig()
    try:
        shards = max(1, train_images // defaults.train.samples_per_shard)
        config = FitConfig(encoder=EncoderConfig(name=encoder, weights=weights, seed=seed, device="cpu"),
                           train=replace(defaults.train, shards=shards), steps=steps, batch_images=batch_images,
                           seed=seed, threads=threads)
        report = fit_encoder(out, config)
    except (ValueError, EncoderWeightsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=1))
        return
    lines = [f"checkpoint {report.checkpoint} ({report.steps} steps, {report.train_images} images, "
             f"{report.train_segments} segments; loss {report.loss_first:.3f} → {report.loss_last:.3f})",
             f"time       " + ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items())]
    for name in report.after:
        lines.append(f"held-out   {name}: {report.before[name]:.3f} before → {report.after[name]:.3f} after "
                     f"({report.heldout_segments} segments)")
    lines.append(f"NOTE       {report.encoder.get('note') or 'fitted on generated scenes only'}")
    typer.echo("\n".join(lines))


def _run_job(job: Callable[[], Any], errors: tuple[type[Exception], ...], show: Callable[[Any], None],
             ray_address: str | None, as_json: bool) -> Any:
    """Connect Ray if asked, run `job`, print its report (JSON or `show`); None after a user error (printed)."""
    from bank_builder.ray_runtime import init_ray

    if ray_address:
        init_ray(ray_address)  # else the job starts a local Ray once its options are checked
    try:
        report = job()
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        return None
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=1))
    else:
        show(report)
    return report


def run_build(config: BuildConfig, ray_address: str | None, as_json: bool) -> int:
    """Run a build with console progress, print its report; returns the process exit status."""
    from bank_builder.encoder_pool import EncoderStartError
    from bank_builder.encoders import EncoderWeightsError
    from bank_builder.format import BankError as BankMismatchError
    from bank_builder.pipeline import build_bank
    from bank_builder.progress import ConsolePrinter
    from bank_builder.segments import unlabelled_warning

    report = _run_job(lambda: build_bank(config, on_progress=ConsolePrinter(config.pipeline.progress_interval_s)),
                      (EncoderWeightsError, EncoderStartError, BankMismatchError, ValueError), print_report,
                      ray_address, as_json)
    if report is None:
        return 2
    warning = unlabelled_warning(report.labelled, report.unlabelled_by_kind, config.ingest.mask_kind)
    if warning:
        typer.secho(f"WARNING   {warning}", err=True, fg=typer.colors.RED, bold=True)
    return 0 if report.ok else 1


def print_report(report) -> None:
    """Human-readable summary of a BuildReport."""
    enc = report.encoder
    state = f"published version {report.version}" if report.version else (
        "already up to date, nothing published" if report.up_to_date else "NOT published (failed shards)")
    kinds = ", ".join(f"{kind} {n}" for kind, n in report.unlabelled_by_kind.items())
    lines = [
        f"bank      {report.bank}: {state}",
        f"shards    {report.shards} ({report.parts_written} built, {report.parts_skipped} reused, {len(report.failed)} failed)",
        f"contents  {report.samples} images, {report.segments} segments, {report.rejects} rejects {report.reject_reasons or ''}",
        f"labels    {report.labelled} labelled, {report.unlabelled} unlabelled" + (f" ({kinds})" if kinds else ""),
        f"speed     {report.seconds:.1f} s, {report.images_per_s:.1f} images/s, {report.segments_per_s:.1f} segments/s "
        f"({report.shard_retries} shard retries, {report.actor_restarts} actor restarts)",
        f"encoder   {enc['name']} ({enc['family']} {enc['architecture']}), weights: {enc['weights']}",
    ]
    if enc["untrained"]:
        lines.append(f"WARNING   encoder weights are UNTRAINED (seed {enc['seed']}): embeddings carry no learned semantics")
    if enc.get("note"):
        lines.append(f"NOTE      {enc['note']}")
    for f in report.failed:
        lines.append(f"FAILED    {f.shard}: {f.error}")
    typer.echo("\n".join(lines))


@app.command("build")
def build_cmd(
    source: str = typer.Argument(..., help="Input shards: path or URL pattern with {000..009} braces and globs."),
    bank: str = typer.Argument(..., help="Bank URI to create or extend: a local directory or s3://bucket/prefix."),
    mask_kind: MaskKind = typer.Option(
        MaskKind.AUTO, help="How to read masks. auto: per sample, mask.png with json `segments` → instance, "
        "`label` → binary, `classes` → class; else rle.json → rle. Or one format for every sample; none = "
        "superpixels for every image."),
    on_missing_mask: Optional[OnMissingMask] = typer.Option(
        None, help="A sample without a usable mask: reject it, or cut it into unlabelled superpixels. Default: "
        f"reject in a shard that has masks (--mask-kind names a format, or auto finds a mask in its first "
        f"{MASK_PROBE_SAMPLES} samples), superpixels in a shard without any."),
    min_area: int = typer.Option(SegmentConfig.min_area, help="Drop segments smaller than this many pixels."),
    encoder: Optional[str] = typer.Option(
        None, help=f"Encoder registry entry (see `refbank encoders`); default {EncoderConfig.name}."),
    encoder_config: Optional[Path] = typer.Option(
        None, help="Your own encoder: a JSON registry entry (docs/ENCODERS.md). The whole entry travels with the "
        "job to every worker and into the bank, so `refbank serve` rebuilds it from the bank alone."),
    weights: str = typer.Option(
        "pretrained", help="'pretrained' (the entry's published weights), 'untrained' (seeded random weights, "
        "explicitly), or a local checkpoint path."),
    seed: int = typer.Option(0, help="Seed of untrained weights."),
    batch_size: int = typer.Option(PipelineConfig.batch_size, help="Images per encoder call."),
    num_encoders: Optional[int] = typer.Option(None, help="Encoder actors (default: one per GPU, else one)."),
    max_attempts: int = typer.Option(PipelineConfig.max_attempts, help="Attempts per shard before it is reported failed."),
    ray_address: Optional[str] = RAY_ADDRESS,
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Build (or resume, or extend) a bank: segments → embeddings → Parquet parts → a new bank version.

    Shards already committed with the same options are skipped, so re-running after a crash finishes
    the work without duplicating a segment. Exit status: 0 ok, 1 some shards failed (listed; nothing
    published; re-run to retry them), 2 bad options or encoder/bank mismatch.
    """
    _setup_logging(verbose)
    try:
        config = BuildConfig(
            source=source, bank=bank,
            ingest=IngestConfig(mask_kind=mask_kind, on_missing_mask=on_missing_mask),
            segments=SegmentConfig(min_area=min_area),
            encoder=_encoder_config(encoder, encoder_config, weights, seed),
            pipeline=PipelineConfig(batch_size=batch_size, num_encoders=num_encoders, max_attempts=max_attempts),
            storage_options=_storage_options(storage_option, endpoint_url),
        )
    except ValueError as exc:  # an unknown encoder, a bad encoder config file, contradictory mask options
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_build(config, ray_address, as_json))


def _encoder_config(name: str | None, path: Path | None, weights: str, seed: int) -> EncoderConfig:
    """The encoder of `--encoder` (a registry name) or `--encoder-config` (a file; then --encoder may only repeat it)."""
    if path is None:
        return EncoderConfig(name=name or EncoderConfig.name, weights=weights, seed=seed)
    from bank_builder.encoders import encoder_config_from_file

    config = encoder_config_from_file(path, weights=weights, seed=seed)
    if name is not None and name != config.name:
        raise ValueError(f"--encoder {name} and --encoder-config {path} (encoder {config.name!r}) disagree; "
                         "give one of them")
    return config


@app.command("encoders")
def encoders_cmd() -> None:
    """List the encoder registry: name, family, architecture, pretrained weights, input size, dims."""
    from bank_builder.encoders import get_encoder_entry, list_encoders

    for name in list_encoders():
        e = get_encoder_entry(name)
        typer.echo(f"{name:16s} {e['family']:9s} {e['architecture']:34s} pretrained={e.get('pretrained')} "
                   f"image={e['image_size']} patch={e['patch_size']} dims={e['visual_dim']}/{e.get('text_dim')}"
                   + (f"\n{'':16s} NOTE: {e['note']}" if e.get("note") else ""))


@app.command("index")
def index_cmd(
    bank: str = typer.Argument(..., help="Bank URI whose CURRENT version to index (local dir or s3://...)."),
    factory: Optional[str] = typer.Option(None, help="faiss factory string (IVF variants), e.g. 'IVF4096,PQ32'; "
                                          "default: chosen from the bank size and --memory-target."),
    memory_target: int = typer.Option(IndexConfig.memory_target_bytes_per_vector,
                                      help="Resident bytes per vector of the searchable index (picks the code size)."),
    opq: bool = typer.Option(False, help="Rotate with OPQ before IVF-PQ (automatic choice only)."),
    refine: bool = typer.Option(True, help="Store float16 vectors with the lists and re-rank candidates exactly."),
    target_recall: float = typer.Option(IndexConfig.target_recall, help="nprobe autotune target for recall@10."),
    object_mb: int = typer.Option(IndexConfig.object_bytes >> 20, help="Target size of one list object, MiB (readers "
                                  "fetch single lists by byte range; this bounds the builder's memory)."),
    retrain: bool = typer.Option(False, help="Train and build from scratch, even when CURRENT's index could take "
                                 "the new parts as a delta (the report recommends it when deltas drift)."),
    ray_address: Optional[str] = RAY_ADDRESS,
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Build the IVF index of a bank: train once, add parts in parallel, write list objects and a list directory.

    On a bank whose CURRENT index lacks some parts, only those are added (a delta with the same quantizer); an
    index that holds every part is up to date and nothing is published. Publishes the next bank version with
    the index in its manifest and a report (recall@10 vs nprobe, latency, size, drift) next to the index.
    Exit status: 0 ok (or up to date), 2 bad options, a bank with no version, or a concurrent writer.
    """
    _setup_logging(verbose)
    config = IndexConfig(factory=factory, memory_target_bytes_per_vector=memory_target, opq=opq, refine=refine,
                         target_recall=target_recall, object_bytes=object_mb << 20)
    raise typer.Exit(run_index(bank, config, _storage_options(storage_option, endpoint_url), ray_address, as_json,
                               retrain))


def run_index(bank: str, config: IndexConfig, storage_options: dict, ray_address: str | None, as_json: bool,
              retrain: bool = False) -> int:
    """Build a bank's index, print its report; returns the process exit status."""
    from bank_builder.index import build_index
    from bank_builder.format import BankError as BankMismatchError

    report = _run_job(lambda: build_index(bank, config, storage_options, retrain=retrain),
                      (BankMismatchError, ValueError),
                      print_index_report, ray_address, as_json)
    return 2 if report is None else 0


def print_index_report(report) -> None:
    """Human-readable summary of an IndexReport."""
    if report.mode == "up_to_date":
        typer.echo(f"index     {report.bank}: up to date — index {report.index_id} holds every part of "
                   f"{report.source_version}; nothing published")
        return
    if report.mode == "delta":
        d = report.delta
        advice = "  RETRAIN RECOMMENDED: run `refbank index --retrain`" if d["retrain_recommended"] else ""
        typer.echo("\n".join([
            f"index     {report.bank}: published version {report.version} (index {report.index_id}, delta {d['id']})",
            f"delta     {d['vectors']} vectors from {len(d['parts'])} new parts; {d['deltas']} deltas in all; "
            f"{report.vectors} vectors indexed",
            f"drift     mean coarse distance {d['drift_ratio']:.2f}x the base's{advice}",
            "time      " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items()),
        ]))
        return
    mib = report.bytes["total"] / 2**20
    refine = f", refine x{report.refine_factor}" if report.refine_factor else ""
    target = "" if report.target_met else "  (TARGET NOT MET: raise --memory-target or use a finer --factory)"
    typer.echo("\n".join([
        f"index     {report.bank}: published version {report.version} (index {report.index_id})",
        f"layout    {report.factory} ({report.kind}), {report.vectors} vectors, {report.nlist} lists, "
        f"{report.objects} list objects, {mib:.1f} MiB",
        f"search    nprobe {report.nprobe}{refine}: recall@{report.k} {report.recall_at_k:.3f}, "
        f"{report.ms_per_query:.2f} ms/query{target}",
        f"time      " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items()),
        f"report    {report.report}",
    ]))


@app.command("serve")
def serve_cmd(
    bank: str = typer.Argument(..., help="Bank URI to serve (local dir or s3://...); it must have an index."),
    version: Optional[str] = typer.Option(None, help="Bank version; default: CURRENT."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    cache_dir: Optional[Path] = typer.Option(None, help="Local disk tier of the list cache: lists fetched from the "
                                             "bank are kept here by content (and survive restarts)."),
    disk_cache_mb: int = typer.Option(4096, help="Byte limit of --cache-dir, MiB (least recently used go first)."),
    prefetch: bool = typer.Option(False, help="After the bank opens, fill the free memory budget in the background "
                                  "with the lists earlier runs probed most (counts kept in --cache-dir), else "
                                  "the largest; requests always go first."),
    memory_mb: int = typer.Option(1024, help="Memory budget of resident inverted lists, MiB. Lists are fetched by byte "
                                  "range when a query first probes them; when the whole index fits nothing is ever "
                                  "evicted, otherwise lists are evicted (2Q: lists seen once go first) to make room."),
    weights: Optional[str] = typer.Option(None, help="Checkpoint path overriding the weights the bank records."),
    token: Optional[str] = typer.Option(None, envvar="REFBANK_TOKEN", help="Require this bearer token on /v1 and /admin."),
    follow: bool = typer.Option(False, help="Follow CURRENT: when another version is published (build, index, "
                                "remove, compact), switch to it without dropping a request."),
    poll_seconds: float = typer.Option(5.0, help="With --follow: how often CURRENT is read."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
) -> None:
    """Serve a bank over HTTP: /v1/segment, /v1/search, /v1/bank, /metrics, /docs, and a page at /.

    Loads the encoder the bank was built with (refusing a mismatch), then loads inverted lists on demand.
    """
    from query.service import serve
    from query.serving import ServiceConfig

    _setup_logging(True)
    serve(ServiceConfig(bank=bank, version=version, storage_options=_storage_options(storage_option, endpoint_url),
                        cache_dir=str(cache_dir) if cache_dir else None, disk_bytes=disk_cache_mb << 20,
                        prefetch=prefetch, memory_bytes=memory_mb << 20, weights=weights, token=token,
                        follow_seconds=poll_seconds if follow else None), host=host, port=port)


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("demo-out"), help="Directory for the generated corpus and the bank."),
    encoder: str = typer.Option("synthetic-clip", help="Encoder registry entry. The default is the stand-in fitted "
                                "on generated scenes (shipped checkpoint); other entries run with untrained seeded "
                                "weights unless --weights says otherwise."),
    weights: Optional[str] = typer.Option(None, help="'untrained', 'pretrained' or a checkpoint path; default: the "
                                          "shipped stand-in for synthetic-clip, untrained for any other entry."),
    shards: int = typer.Option(4, help="Corpus shards."),
    samples_per_shard: int = typer.Option(24, help="Samples per shard."),
) -> None:
    """The main job end to end on embedded defaults: corpus, bank, index, HTTP service, held-out segmentation."""
    from jobs.demo import DemoConfig, run_demo

    _setup_logging(False)
    raise typer.Exit(run_demo(DemoConfig(workdir=workdir, encoder=encoder, weights=weights, shards=shards,
                                         samples_per_shard=samples_per_shard)))


import jobs.lifecycle_cli  # noqa: E402,F401 - registers info, remove, compact, gc, pin, unpin on `app`
import jobs.eval_cli  # noqa: E402,F401 - registers eval on `app`
