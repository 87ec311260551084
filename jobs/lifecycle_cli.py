"""The bank lifecycle commands of `refbank`: info, remove, compact, gc, pin, unpin (registered on jobs.cli.app).

Each is a thin layer over a library function (bank_builder.lifecycle, bank_builder.index.compact) and publishes
through the same compare-and-swap as build and index: a concurrent writer makes it fail with a message, never
half-publish. Failures are raised and answered by jobs.group (one line, exit status as in jobs.errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.cli import AS_JSON, ENDPOINT_URL, STORAGE_OPTION, VERBOSE, app, storage_options
from jobs.console import setup_logging, show


@app.command("info")
def info_cmd(
    bank: str = typer.Argument(..., help="Bank URI (local dir or s3://...)."),
    version: Optional[str] = typer.Option(None, help="Version to describe; default: CURRENT."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
) -> None:
    """What a bank holds: versions (dates, parents, pins), parts, segment and label counts, the index with its
    deltas, tombstones, sizes on storage and the encoder."""
    from bank_builder.lifecycle import bank_info

    show(bank_info(bank, version, storage_options(storage_option, endpoint_url)), as_json, _info_text)


def _info_text(info: dict) -> str:
    totals, index, size = info["totals"], info["index"], info["storage"]
    lines = [f"bank      {info['bank']}: version {info['version']} (CURRENT {info['current']})"]
    for v in info["versions"]:
        flags = " ".join(f for f, on in (("CURRENT", v["current"]), ("pinned", v["pinned"])) if on)
        lines.append(f"  {v['version']}  parent {v['parent'] or '-':8}  published {v['published_at'] or '?'}  {flags}")
    lines += [f"contents  {len(info['parts'])} parts, {totals['segments']} segments ({info['labelled']} labelled), "
              f"{totals.get('removed', 0)} removed, {totals['samples']} images, {totals['rejects']} rejects",
              f"encoder   {info['encoder']['name']} ({info['encoder']['architecture']}), weights "
              f"{info['encoder']['weights']}{' UNTRAINED' if info['encoder'].get('untrained') else ''}"]
    if index is None:
        lines.append("index     none (run `refbank index`)")
    else:
        lines.append(f"index     {index['id']}: {index['factory']}, {index['vectors']} vectors, {index['nlist']} lists "
                     f"in {index['list_objects']} objects, nprobe {index['nprobe']}, {index['labels']} labels, "
                     f"{len(index['deltas'])} deltas, {index['parts_not_indexed']} parts not indexed")
    tombstones = info["tombstones"]
    lines.append(f"removed   {tombstones['segments']} segments in {tombstones['objects']} tombstones "
                 f"{tombstones['reasons'] or ''}")
    lines.append(f"storage   {size['version_bytes'] / 2**20:.1f} MiB used by this version, "
                 f"{size['bank_bytes'] / 2**20:.1f} MiB in {size['bank_objects']} objects in all")
    return "\n".join(lines)


@app.command("remove")
def remove_cmd(
    bank: str = typer.Argument(..., help="Bank URI (local dir or s3://...)."),
    shard: Optional[list[str]] = typer.Option(None, help="Remove every segment of this input shard URL (repeatable)."),
    image_key: Optional[list[str]] = typer.Option(None, help="Remove every segment of this image key (repeatable)."),
    label: Optional[list[str]] = typer.Option(None, help="Remove every segment with this label (repeatable)."),
    segment_ids: Optional[Path] = typer.Option(None, help="A file of segment ids to remove, one per line."),
    reason: str = typer.Option(..., help="Why (recorded with the tombstone), e.g. 'takedown #123'."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Hide segments from every search and metadata lookup at once: publishes a version with a tombstone (no
    rebuild). A service following CURRENT honours it from its next request after the switch."""
    from bank_builder.lifecycle import Removal, remove_segments

    setup_logging(verbose)

    ids = _read_ids(segment_ids) if segment_ids else ()
    removal = Removal(shards=tuple(shard or ()), image_keys=tuple(image_key or ()), labels=tuple(label or ()),
                      segment_ids=ids, reason=reason)
    show(remove_segments(bank, removal, storage_options(storage_option, endpoint_url)), as_json, lambda r: (
        f"removed   {r.removed} segments ({r.already_removed} were removed already) from {r.bank}: "
        + (f"published version {r.version}" if r.version else "nothing new, nothing published")))


def _read_ids(path: Path) -> tuple[int, ...]:
    """Segment ids from a file, one per line (blank lines and # comments skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read --segment-ids {path}: {exc.strerror}") from None
    ids = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                ids.append(int(text))
            except ValueError:
                raise ValueError(f"{path} line {number}: {text!r} is not a segment id (an integer)") from None
    return tuple(ids)


@app.command("compact")
def compact_cmd(
    bank: str = typer.Argument(..., help="Bank URI (local dir or s3://...)."),
    object_mb: int = typer.Option(64, help="Target size of one list object, MiB."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Fold the index's deltas and the tombstones into new base lists (same quantizer) as a new version."""
    from bank_builder.index.compact import compact_index

    setup_logging(verbose)
    show(compact_index(bank, storage_options(storage_option, endpoint_url), object_mb << 20), as_json,
         lambda r: (
             f"compact   {r.bank}: " + (f"published version {r.version}, index {r.index_id}: {r.folded_deltas} "
                                        f"deltas folded, {r.removed_vectors} removed vectors dropped, {r.vectors} "
                                        f"vectors in {r.objects} objects ({r.seconds:.1f} s)" if r.version else
                                        "nothing to fold, nothing published")))


@app.command("gc")
def gc_cmd(
    bank: str = typer.Argument(..., help="Bank URI (local dir or s3://...)."),
    keep: int = typer.Option(3, help="Newest published versions to keep (CURRENT and pinned ones are kept too)."),
    grace_minutes: float = typer.Option(60.0, help="Objects younger than this are kept: a writer may be using "
                                        "them before it publishes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be deleted; delete nothing."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
    as_json: bool = AS_JSON,
) -> None:
    """Delete the objects no retained version uses (older versions, replaced indexes, unpublished leftovers)."""
    from bank_builder.lifecycle import collect_garbage

    show(collect_garbage(bank, keep, grace_minutes * 60, dry_run, storage_options(storage_option, endpoint_url)),
         as_json,
         lambda r: (
             f"gc        {r.bank}: {'would delete' if r.dry_run else 'deleted'} {len(r.deleted)} objects "
             f"({r.deleted_bytes / 2**20:.1f} MiB); kept {r.kept_objects} ({r.kept_bytes / 2**20:.1f} MiB) of "
             f"versions {', '.join(r.retained_versions)} and {len(r.kept_young)} younger than the grace period"))


@app.command("pin")
def pin_cmd(
    bank: str = typer.Argument(..., help="Bank URI (local dir or s3://...)."),
    version: str = typer.Argument(..., help="The version to keep from garbage collection."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
) -> None:
    """Keep a version from garbage collection until `refbank unpin`."""
    from bank_builder.format import BankRef, pin

    show(pin(BankRef(bank, storage_options(storage_option, endpoint_url)), version) or {}, False,
         lambda _: f"pinned    {version} of {bank}")


@app.command("unpin")
def unpin_cmd(
    bank: str = typer.Argument(..., help="Bank URI (local dir or s3://...)."),
    version: str = typer.Argument(..., help="The version garbage collection may take again."),
    storage_option: Optional[list[str]] = STORAGE_OPTION,
    endpoint_url: Optional[str] = ENDPOINT_URL,
) -> None:
    """Let garbage collection take a pinned version again."""
    from bank_builder.format import BankRef, unpin

    show({"unpinned": unpin(BankRef(bank, storage_options(storage_option, endpoint_url)), version)}, False,
         lambda r: f"unpinned  {version} of {bank}" if r["unpinned"] else f"{version} was not pinned")
