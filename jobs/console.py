"""What a `refbank` command prints besides its report: log levels, the libraries kept quiet unless -v, and the
shared pieces of printing a report (JSON or text)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, is_dataclass
from typing import Any, Callable

import typer

# Library lines a refbank user has no use for, shown with -v: Ray's token-authentication notice (printed by every
# local Ray start) and its start-up INFO lines. open_clip logs its INFO lines on the root logger, which stays at
# WARNING without -v.
_QUIET = {"ray._private.authentication": logging.ERROR, "ray._private.worker": logging.WARNING}


def setup_logging(verbose: bool, service: bool = False) -> None:
    """Log level INFO with -v, else WARNING; a service logs refbank's own INFO lines (what it serves) either way."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # basicConfig does nothing when a handler exists already
    logging.getLogger("refbank").setLevel(logging.INFO if service or verbose else logging.NOTSET)
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else quiet)


def show(result: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    """Print a command's result: as JSON (a dataclass or a dict), or as the lines `text` makes of it."""
    if as_json:
        typer.echo(json.dumps(asdict(result) if is_dataclass(result) else result, indent=1))
    else:
        typer.echo(text(result))
