"""Every expected failure of a `refbank` command as one line on stderr and a documented exit status, or, with
`--json`, as one error object on stdout: {"error": kind, "detail": message, "exit_code": status}.

The one mapping for every command: `jobs.group.RefbankGroup` sends whatever a command raises here. Anything
not listed is a bug: its traceback is printed, then one line, and the status is INTERNAL.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import asdict, dataclass
from typing import Any

OK, SHARDS_FAILED, USAGE, STORAGE, DAMAGED, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 4, 70, 130

EXIT_STATUS_HELP = (
    "Exit status: 0 done; 1 build: some shards failed (listed, nothing published; re-run to retry them); "
    "2 the command cannot run as given (bad option or config file, no such source or bank, a bank that is not "
    "indexed or was built with other options, weights unavailable, a concurrent writer); 3 storage unreachable "
    "or refused (credentials, endpoint, access); 4 a damaged bank object; 70 an internal error (a bug); 130 "
    "interrupted (Ctrl-C). With --json the error is a JSON object on stdout: {error, detail, exit_code}."
)
INTERRUPTED_LINE = "interrupted — re-run the same command to resume"


class UnquotedGlobError(ValueError):
    """A bank argument that is an existing shard file: the shell expanded an unquoted source pattern."""


@dataclass(frozen=True)
class Failure:
    """What the user is told: the kind (a stable name for scripts), one line, and the exit status."""

    error: str
    detail: str
    exit_code: int


def _loaded(module: str, name: str) -> type | None:
    """The class `name` of `module` if that module is imported (else no exception can be of it): the mapping
    must not import Ray or torch just to look at an error."""
    return getattr(sys.modules.get(module), name, None)


def _unwrap(exc: BaseException) -> BaseException:
    """The error a Ray task raised, rather than Ray's wrapper (whose text holds the remote traceback)."""
    wrapper = _loaded("ray.exceptions", "RayTaskError")
    if wrapper is not None and isinstance(exc, wrapper) and isinstance(getattr(exc, "cause", None), BaseException):
        return exc.cause
    return exc


_STORAGE_HINTS = {
    "no_credentials": "No credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                      "AWS_PROFILE), or pass --storage-option key=... --storage-option secret=... (anon=true for "
                      "a public bucket)",
    "endpoint_unreachable": "The store could not be reached: check --endpoint-url (or REFBANK_S3_ENDPOINT) and "
                            "that the store is up",
    "access_denied": "Access was denied: check that these credentials may read and write there",
    "unavailable": "Check that the store is reachable with these credentials, then run the command again",
}


def _storage(exc: Any) -> Failure:
    reason = exc.reason if exc.reason in _STORAGE_HINTS else "unavailable"
    kind = "storage_unavailable" if reason == "unavailable" else reason
    return Failure(kind, f"storage {exc.operation} of {exc.url} failed: {exc.cause}. {_STORAGE_HINTS[reason]}",
                   STORAGE)


def _bank(exc: BaseException) -> Failure | None:
    from bank_builder.format import errors as e

    kinds = ((e.StorageError, "", STORAGE), (e.BankNotFoundError, "bank_not_found", USAGE),
             (e.BankNotIndexedError, "bank_not_indexed", USAGE), (e.ConcurrentUpdateError, "concurrent_update", USAGE),
             (e.BankMismatchError, "bank_mismatch", USAGE), (e.BankFormatError, "bank_damaged", DAMAGED))
    for cls, kind, status in kinds:  # subclasses first
        if isinstance(exc, cls):
            return _storage(exc) if cls is e.StorageError else Failure(kind, str(exc), status)
    return None


def _usage(exc: BaseException) -> Failure | None:
    """Typer's own usage errors: a missing argument, an unknown option or command, arguments left over."""
    from typer import TyperException

    if not isinstance(exc, TyperException):
        return None
    message, ctx = exc.format_message().rstrip("."), getattr(exc, "ctx", None)
    where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    if "unexpected extra argument" in message:
        return Failure("extra_arguments", f"{message}: more arguments than the command takes. If the shell "
                       "expanded a pattern, quote the pattern (e.g. 'corpus/*.tar')" + where, USAGE)
    return Failure("usage", message + where, USAGE)


def classify(exc: BaseException) -> Failure | None:
    """The Failure of an expected error; None for anything else (a bug)."""
    from bank_builder.ingest import SourceError, SourceIsFolderError
    from jobs.config_files import ConfigFileError

    exc = _unwrap(exc)
    if isinstance(exc, KeyboardInterrupt):
        return Failure("interrupted", INTERRUPTED_LINE, INTERRUPTED)
    found = _usage(exc) or _bank(exc)
    if found is not None:
        return found
    encoder_errors = tuple(c for c in (_loaded("bank_builder.encoders.registry", "EncoderWeightsError"),
                                       _loaded("bank_builder.encoder_pool", "EncoderStartError")) if c)
    for cls, kind in ((ConfigFileError, "config"), (UnquotedGlobError, "unquoted_glob"),
                      (SourceIsFolderError, "source_is_folder"), (SourceError, "source_not_found"),
                      (encoder_errors, "encoder_unavailable"), (ValueError, "invalid")):
        if cls and isinstance(exc, cls):
            return Failure(kind, str(exc), USAGE)
    if isinstance(exc, OSError):  # the local machine's answer (a folder not writable, a full disk)
        where = f": {exc.filename}" if exc.filename else ""
        return Failure("os_error", f"{exc.strerror or exc}{where}", STORAGE)
    return None


def report(exc: BaseException, as_json: bool, verbose: bool = False) -> int:
    """Tell the user about `exc` (one line on stderr, or the JSON object on stdout); returns the exit status."""
    failure = classify(exc)
    if failure is None or verbose and not isinstance(exc, KeyboardInterrupt):
        traceback.print_exception(exc, file=sys.stderr)
    if failure is None:
        failure = Failure("internal", f"internal error (a bug in refbank; please report it with the traceback "
                          f"above): {type(exc).__name__}: {exc}", INTERNAL)
    detail = " ".join(failure.detail.split())  # one line, whatever the message held
    if as_json:
        print(json.dumps(asdict(Failure(failure.error, detail, failure.exit_code))), flush=True)
    else:
        prefix = "" if failure.error == "interrupted" else "error: "
        print(prefix + detail, file=sys.stderr, flush=True)
    return failure.exit_code
