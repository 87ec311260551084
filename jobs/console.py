"""What a `refbank` command prints besides its report: log levels, the libraries kept quiet unless -v, and the
shared pieces of printing a report (JSON or text)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from types import FrameType
from typing import Any, Callable, Iterator

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


@contextmanager
def interrupt_guard() -> Iterator[Callable[[], None]]:
    """Ctrl-C that is never lost: yields `check()`, to call often (each progress event). SIGINT raises
    KeyboardInterrupt at once, except inside an object finalizer (`__del__`, e.g. Ray's ObjectRefGenerator's),
    where Python would print the exception and carry on as if no key was pressed: there it is only noted, and
    `check()` raises it."""
    pressed = threading.Event()

    def on_sigint(_signum: int, frame: FrameType | None) -> None:
        pressed.set()
        while frame is not None:
            if frame.f_code.co_name == "__del__":
                return  # raised here it would be swallowed; check() raises it from the driver's loop
            frame = frame.f_back
        raise KeyboardInterrupt

    def check() -> None:
        if pressed.is_set():
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield check
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
