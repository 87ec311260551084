"""`refbank build` and `refbank index` (registered on jobs.cli.app): options → configs → the library's jobs,
with console progress and a report. Failures are raised; jobs.group answers them (jobs.errors)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from bank_builder.config import (
    MASK_PROBE_SAMPLES, BuildConfig, EncoderConfig, IngestConfig, MaskKind, OnMissingMask, PairingConfig,
    PipelineConfig, SegmentConfig,
)
from bank_builder.index.params import IndexConfig
from jobs.cli import AS_JSON, ENDPOINT_URL, RAY_ADDRESS, STORAGE_OPTION, VERBOSE, app, connect_ray, storage_options
from jobs.console import interrupt_guard, setup_logging, show
from jobs.errors import UnquotedGlobError


def run_build(config: BuildConfig, ray_address: str | None, as_json: bool) -> int:
    """Run a build with console progress, print its report; returns the process exit status (0, or 1 when
    shards failed). Raises what the build raises (jobs.errors maps it)."""
    from bank_builder.pipeline import build_bank
    from bank_builder.progress import console_progress
    from bank_builder.segments import unlabelled_warning

    connect_ray(ray_address)
    with interrupt_guard() as check, console_progress(config.pipeline.progress_interval_s) as printer:
        report = build_bank(config, on_progress=lambda progress: (check(), printer(progress)))
    show(report, as_json, build_text)
    warning = unlabelled_warning(report.labelled - report.paired, report.unlabelled_by_kind, config.ingest.mask_kind)
    if report.pairing_skipped and report.unlabelled:
        typer.secho(f"WARNING   {report.unlabelled} segments have no label and none was paired with a caption phrase: "
                    f"{report.pairing_skipped}. To label them from captions, build with an encoder that has one "
                    "(`refbank encoders`: dims VISUAL/TEXT, not /None); --no-pairing says you want none",
                    err=True, fg=typer.colors.RED, bold=True)
    if warning:
        typer.secho(f"WARNING   {warning}", err=True, fg=typer.colors.RED, bold=True)
    return 0 if report.ok else 1


def build_text(report: Any) -> str:
    """Human-readable summary of a BuildReport."""
    enc = report.encoder
    state = f"published version {report.version}" if report.published else (
        f"already up to date at version {report.version}, nothing published" if report.up_to_date
        else "NOT published (failed shards)")
    kinds = ", ".join(f"{kind} {n}" for kind, n in report.unlabelled_by_kind.items())
    lines = [
        f"bank      {report.bank}: {state}",
        f"shards    {report.shards} ({report.parts_written} built, {report.parts_skipped} reused, {len(report.failed)} failed)",
        f"contents  {report.samples} images, {report.segments} segments, {report.rejects} rejects {report.reject_reasons or ''}",
        f"labels    {report.labelled - report.paired} labelled by their masks, {report.unlabelled} not"
        + (f" ({kinds})" if kinds else "") + (f"; {report.paired} of those paired with a phrase" if report.paired else ""),
        f"speed     {report.seconds:.1f} s ({report.startup_s:.1f} s start-up), {report.images_per_s:.1f} images/s, "
        f"{report.segments_per_s:.1f} segments/s after start-up ({report.shard_retries} shard retries, "
        f"{report.actor_restarts} actor restarts)",
        f"encoder   {enc['name']} ({enc['family']} {enc['architecture']}), weights: {enc['weights']}",
    ]
    if enc["untrained"]:
        lines.append(f"WARNING   encoder weights are UNTRAINED (seed {enc['seed']}): embeddings carry no learned semantics")
    if enc.get("note"):
        lines.append(f"NOTE      {enc['note']}")
    for f in report.failed:
        lines.append(f"FAILED    {f.shard}: {f.error}")
    return "\n".join(lines)


def _check_bank_argument(source: str, bank: str) -> None:
    """Refuse a bank argument that is a file: `refbank build dir/*.tar bank` unquoted with two shards makes the
    shell pass the second shard as the bank (with more shards, typer reports the extra arguments)."""
    if "://" not in bank and os.path.isfile(bank):
        raise UnquotedGlobError(
            f"the bank {bank!r} is a file, not a bank folder: did the shell expand an unquoted pattern into "
            f"{source!r} {bank!r} ...? Quote the pattern: refbank build '{os.path.dirname(source) or '.'}/*.tar' BANK")


@app.command("build")
def build_cmd(
    source: str = typer.Argument(..., help="Input shards: path or URL pattern with {000..009} braces and globs; "
                                 "quote it, so the shell leaves the * to refbank."),
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
    pairing: bool = typer.Option(PairingConfig.enabled, help="Pair a captioned image's unlabelled segments with its "
                                 "phrases (json `phrases`, else the `caption` chunked); needs a text tower."),
    pairing_rule: str = typer.Option(PairingConfig.rule, help="mutual: a phrase labels its best segment among those "
                                     "whose own best phrase it is; best: among all (ReME's plain rule)."),
    pairing_threshold: Optional[float] = typer.Option(
        PairingConfig.threshold, help="Also label every unlabelled segment whose best phrase reaches this cosine "
        "(default: each phrase labels at most one segment)."),
    pairing_margin: float = typer.Option(PairingConfig.margin, help="Pair a segment only when its cosine to the "
                                         "phrase beats its cosine to every other phrase of the image by this much "
                                         "(0: no margin)."),
    encoder: Optional[str] = typer.Option(
        None, help=f"Encoder registry entry (see `refbank encoders`); default {EncoderConfig.name}."),
    encoder_config: Optional[Path] = typer.Option(
        None, help="Your own encoder: a JSON registry entry (docs/ENCODERS.md). The whole entry travels with the "
        "job to every worker and into the bank, so `refbank serve` rebuilds it from the bank alone."),
    weights: str = typer.Option(
        "pretrained", help="'pretrained' (the entry's published weights), 'untrained' (seeded random weights, "
        "explicitly), or a local checkpoint path."),
    seed: int = typer.Option(0, help="Seed of untrained weights."),
    batch_size: int = typer.Option(
        0, min=0, help="Images per encoder forward pass. 0: the bank's recorded one, else sized from the model and "
        "device (16 on CPUs); the manifest records it."),
    batches_per_call: int = typer.Option(
        0, min=0, help="Batches per encoder actor call: larger calls cost the driver less per image (many GPUs); the "
        "bank's bytes do not depend on it. 0: adaptive, from the measured forward time."),
    num_encoders: Optional[int] = typer.Option(None, help="Encoder actors (default: one per GPU, else one)."),
    gpus: Optional[int] = typer.Option(
        None, min=0, help="GPU encoder actors to ask for, whatever the cluster has at the start: on an autoscaling "
        "cluster the request starts the GPU nodes. Default: the GPUs present at the start (none: a CPU actor); "
        "0: CPU actors only."),
    max_attempts: int = typer.Option(PipelineConfig.max_attempts, help="Attempts per shard before it is reported failed."),
    ray_address: Optional[str] = RAY_ADDRESS,
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Build (or resume, or extend) a bank: segments → embeddings → Parquet parts → a new bank version.

    Shards already committed with the same options are skipped, so re-running after a crash or Ctrl-C finishes
    the work without duplicating a segment. On a terminal a progress bar shows images done of those expected
    and the ETA; otherwise a line per finished shard (at most one every 10 s between).
    """
    setup_logging(verbose)
    _check_bank_argument(source, bank)
    config = BuildConfig(
        source=source, bank=bank,
        ingest=IngestConfig(mask_kind=mask_kind, on_missing_mask=on_missing_mask),
        segments=SegmentConfig(min_area=min_area),
        pairing=PairingConfig(enabled=pairing, rule=pairing_rule, threshold=pairing_threshold,
                              margin=pairing_margin),
        encoder=_encoder_config(encoder, encoder_config, weights, seed),
        pipeline=PipelineConfig(batch_size=batch_size or None, batches_per_call=batches_per_call or None,
                                num_encoders=num_encoders, gpus=gpus, max_attempts=max_attempts),
        storage_options=storage_options(storage_option, endpoint_url),
    )
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
    """
    setup_logging(verbose)
    config = IndexConfig(factory=factory, memory_target_bytes_per_vector=memory_target, opq=opq, refine=refine,
                         target_recall=target_recall, object_bytes=object_mb << 20)
    raise typer.Exit(run_index(bank, config, storage_options(storage_option, endpoint_url), ray_address, as_json,
                               retrain))


def run_index(bank: str, config: IndexConfig, options: dict, ray_address: str | None, as_json: bool,
              retrain: bool = False) -> int:
    """Build a bank's index, print its report; returns the process exit status (raises what the job raises)."""
    from bank_builder.index import build_index

    connect_ray(ray_address)
    show(build_index(bank, config, options, retrain=retrain), as_json, index_text)
    return 0


def index_text(report: Any) -> str:
    """Human-readable summary of an IndexReport."""
    if report.mode == "up_to_date":
        return (f"index     {report.bank}: up to date — index {report.index_id} holds every part of "
                f"{report.source_version}; nothing published")
    if report.mode == "delta":
        d = report.delta
        advice = "  RETRAIN RECOMMENDED: run `refbank index --retrain`" if d["retrain_recommended"] else ""
        return "\n".join([
            f"index     {report.bank}: published version {report.version} (index {report.index_id}, delta {d['id']})",
            f"delta     {d['vectors']} vectors from {len(d['parts'])} new parts; {d['deltas']} deltas in all; "
            f"{report.vectors} vectors indexed",
            f"drift     mean coarse distance {d['drift_ratio']:.2f}x the base's{advice}",
            "time      " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items()),
        ])
    mib = report.bytes["total"] / 2**20
    refine = f", refine x{report.refine_factor}" if report.refine_factor else ""
    target = "" if report.target_met else "  (TARGET NOT MET: raise --memory-target or use a finer --factory)"
    return "\n".join([
        f"index     {report.bank}: published version {report.version} (index {report.index_id})",
        f"layout    {report.factory} ({report.kind}), {report.vectors} vectors, {report.nlist} lists, "
        f"{report.objects} list objects, {mib:.1f} MiB",
        f"search    nprobe {report.nprobe}{refine}: recall@{report.k} {report.recall_at_k:.3f}, "
        f"{report.ms_per_query:.2f} ms/query{target}",
        f"time      " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items()),
        f"report    {report.report}",
    ])
