"""The `refbank` command line: a thin layer over the library's jobs."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from bank_builder.config import (
    BuildConfig, EncoderConfig, IngestConfig, MaskKind, PipelineConfig, SegmentConfig,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Build reference banks of segment embeddings from WebDataset image+mask corpora, and serve them.",
)

STORAGE_HELP = "fsspec storage option KEY=VALUE for s3:// URLs (repeatable), e.g. endpoint_url=http://127.0.0.1:9000."


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
    storage_option: Optional[list[str]] = typer.Option(None, help=STORAGE_HELP),
    endpoint_url: Optional[str] = typer.Option(None, envvar="REFBANK_S3_ENDPOINT", help="S3 endpoint URL."),
) -> None:
    """Write a synthetic, seeded WebDataset image+mask corpus (scenes cut from scikit-image's photos)."""
    from bank_builder.synthetic import CorpusConfig, make_corpus

    config = CorpusConfig(shards=shards, samples_per_shard=samples_per_shard, image_size=image_size,
                          mask_kind=mask_kind, image_format=image_format, heldout_shards=heldout_shards, seed=seed)
    summary = make_corpus(out, config, _storage_options(storage_option, endpoint_url))
    typer.echo(f"wrote {len(summary.shards)} shards + {len(summary.heldout)} held-out, {summary.samples} samples, "
               f"{summary.segments} segments to {out}")


def run_build(config: BuildConfig, ray_address: str | None, as_json: bool) -> int:
    """Run a build with console progress, print its report; returns the process exit status."""
    from bank_builder.encoder_pool import EncoderStartError
    from bank_builder.encoders import EncoderWeightsError
    from bank_builder.manifest import BankMismatchError
    from bank_builder.pipeline import build_bank, init_ray
    from bank_builder.progress import ConsolePrinter

    if ray_address:
        init_ray(ray_address)  # else build_bank starts a local Ray once the options are checked
    try:
        report = build_bank(config, on_progress=ConsolePrinter(config.pipeline.progress_interval_s))
    except (EncoderWeightsError, EncoderStartError, BankMismatchError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=1))
    else:
        print_report(report)
    return 0 if report.ok else 1


def print_report(report) -> None:
    """Human-readable summary of a BuildReport."""
    enc = report.encoder
    state = f"published version {report.version}" if report.version else (
        "already up to date, nothing published" if report.up_to_date else "NOT published (failed shards)")
    lines = [
        f"bank      {report.bank}: {state}",
        f"shards    {report.shards} ({report.parts_written} built, {report.parts_skipped} reused, {len(report.failed)} failed)",
        f"contents  {report.samples} images, {report.segments} segments, {report.rejects} rejects {report.reject_reasons or ''}",
        f"speed     {report.seconds:.1f} s, {report.images_per_s:.1f} images/s, {report.segments_per_s:.1f} segments/s "
        f"({report.shard_retries} shard retries, {report.actor_restarts} actor restarts)",
        f"encoder   {enc['name']} ({enc['family']} {enc['architecture']}), weights: {enc['weights']}",
    ]
    if enc["untrained"]:
        lines.append(f"WARNING   encoder weights are UNTRAINED (seed {enc['seed']}): embeddings carry no learned semantics")
    for f in report.failed:
        lines.append(f"FAILED    {f.shard}: {f.error}")
    typer.echo("\n".join(lines))


@app.command("build")
def build_cmd(
    source: str = typer.Argument(..., help="Input shards: path or URL pattern with {000..009} braces and globs."),
    bank: str = typer.Argument(..., help="Bank URI to create or extend: a local directory or s3://bucket/prefix."),
    mask_kind: MaskKind = typer.Option(MaskKind.INSTANCE, help="How to read masks (none = superpixels for all)."),
    require_mask: bool = typer.Option(False, help="Reject samples without a mask instead of using superpixels."),
    min_area: int = typer.Option(SegmentConfig.min_area, help="Drop segments smaller than this many pixels."),
    encoder: str = typer.Option(EncoderConfig.name, help="Encoder registry entry (see `refbank encoders`)."),
    weights: str = typer.Option(
        "pretrained", help="'pretrained' (the entry's published weights), 'untrained' (seeded random weights, "
        "explicitly), or a local checkpoint path."),
    seed: int = typer.Option(0, help="Seed of untrained weights."),
    batch_size: int = typer.Option(PipelineConfig.batch_size, help="Images per encoder call."),
    num_encoders: Optional[int] = typer.Option(None, help="Encoder actors (default: one per GPU, else one)."),
    max_attempts: int = typer.Option(PipelineConfig.max_attempts, help="Attempts per shard before it is reported failed."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray."),
    storage_option: Optional[list[str]] = typer.Option(None, help=STORAGE_HELP),
    endpoint_url: Optional[str] = typer.Option(None, envvar="REFBANK_S3_ENDPOINT", help="S3 endpoint URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log stage details."),
) -> None:
    """Build (or resume, or extend) a bank: segments → embeddings → Parquet parts → a new bank version.

    Shards already committed with the same options are skipped, so re-running after a crash finishes
    the work without duplicating a segment. Exit status: 0 ok, 1 some shards failed (listed; nothing
    published; re-run to retry them), 2 bad options or encoder/bank mismatch.
    """
    _setup_logging(verbose)
    config = BuildConfig(
        source=source, bank=bank,
        ingest=IngestConfig(mask_kind=mask_kind, require_mask=require_mask),
        segments=SegmentConfig(min_area=min_area),
        encoder=EncoderConfig(name=encoder, weights=weights, seed=seed),
        pipeline=PipelineConfig(batch_size=batch_size, num_encoders=num_encoders, max_attempts=max_attempts),
        storage_options=_storage_options(storage_option, endpoint_url),
    )
    raise typer.Exit(run_build(config, ray_address, as_json))


@app.command("encoders")
def encoders_cmd() -> None:
    """List the encoder registry: name, family, architecture, pretrained weights, input size, dims."""
    from bank_builder.encoders import get_encoder_entry, list_encoders

    for name in list_encoders():
        e = get_encoder_entry(name)
        typer.echo(f"{name:16s} {e['family']:9s} {e['architecture']:34s} pretrained={e.get('pretrained')} "
                   f"image={e['image_size']} patch={e['patch_size']} dims={e['visual_dim']}/{e.get('text_dim')}")


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("demo-out"), help="Directory for the generated corpus and the bank."),
    encoder: str = typer.Option("clip-vit-b32", help="Encoder registry entry; run with untrained seeded weights."),
    shards: int = typer.Option(4, help="Corpus shards."),
    samples_per_shard: int = typer.Option(24, help="Samples per shard."),
) -> None:
    """The main job end to end on embedded defaults: generate a corpus, build a bank locally, print a summary."""
    _setup_logging(False)
    corpus = workdir / "corpus"
    make_corpus_cmd(str(corpus), shards=shards, samples_per_shard=samples_per_shard, image_size=256,
                    mask_kind=MaskKind.INSTANCE, image_format="jpg", heldout_shards=1, seed=0,
                    storage_option=None, endpoint_url=None)
    config = BuildConfig(source=str(corpus / "train-*.tar"), bank=str(workdir / "bank"),
                         encoder=EncoderConfig(name=encoder, weights="untrained", seed=0))
    raise typer.Exit(run_build(config, None, as_json=False))
