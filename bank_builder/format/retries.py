"""The retry policy of every storage call, and the process-wide counters that show what it did.

A call that fails for a transient reason — the store throttles (503 SlowDown, 429, ...), answers 5xx, or the
connection is reset, times out or is cut short — is tried again after an exponential backoff with jitter, at
most `RetryPolicy.attempts` times in all; then it raises StorageError naming the operation, the object and the
last cause. Any other failure (access denied, no such bucket, a full local disk) raises StorageError at once.
A missing object raises FileNotFoundError and a refused conditional write PreconditionFailed: those are
answers, not failures, and are never retried.

Counters (`counters()`) are per process: the build and index drivers read them around their own calls, a Ray
task around its body (returning the difference), the query service at each /metrics scrape.
"""

from __future__ import annotations

import errno
import http.client
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from bank_builder.format.errors import StorageError

log = logging.getLogger("refbank.storage")

T = TypeVar("T")

# S3 error codes that mean "slow down" (AWS SDKs retry these as throttling; some come with a 400 or 403).
THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "ProvisionedThroughputExceededException", "PriorRequestNotComplete",
})
# 4xx codes that S3 uses for a request the network spoiled: sending it again is the documented fix.
_TRANSIENT_4XX = frozenset({"RequestTimeout", "XAmzContentSHA256Mismatch", "BadDigest"})


class PreconditionFailed(Exception):
    """A conditional write found the object other than expected (created, or changed by another writer)."""


class ConditionalWritesUnsupported(Exception):
    """The store behind a URL offers no conditional writes, so concurrent writers could lose updates."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a storage call is retried: at most `attempts` tries in all; before try n+1 a pause drawn from
    [d/2, d] with d = min(max_backoff_s, first_backoff_s · 2**(n-1)) — about 9 s in all when every try fails."""

    attempts: int = 10
    first_backoff_s: float = 0.05
    max_backoff_s: float = 2.0

    def pause(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 = the second try)."""
        d = min(self.max_backoff_s, self.first_backoff_s * 2 ** (retry - 1))
        return random.uniform(d / 2, d)


RETRY = RetryPolicy()


@dataclass(frozen=True)
class StorageCounts:
    """What storage calls did, as counters since the process started (or a difference of two snapshots).

    tries: storage calls tried (a retry is one more; one call may be more than one HTTP request, e.g. a listing
    of many pages); retries: tries after a transient failure; throttled / server_errors / connection_errors:
    transient failures by cause (503 SlowDown and other throttling; other 5xx; resets, timeouts, answers cut
    short); recovered: calls that got their answer (a result, not-found, a refused condition) after at least one
    retry; failed: calls that raised StorageError (retries exhausted, or a failure no retry can fix)."""

    tries: int = 0
    retries: int = 0
    throttled: int = 0
    server_errors: int = 0
    connection_errors: int = 0
    recovered: int = 0
    failed: int = 0

    def __add__(self, other: StorageCounts) -> StorageCounts:
        return StorageCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: StorageCounts) -> StorageCounts:
        return StorageCounts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def to_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for JSON reports and metrics)."""
        return asdict(self)


_lock = threading.Lock()
_totals: dict[str, int] = {f.name: 0 for f in fields(StorageCounts)}


def counters() -> StorageCounts:
    """This process's storage counters so far (monotonic; subtract two snapshots for one job's share)."""
    with _lock:
        return StorageCounts(**_totals)


def _count(**deltas: int) -> None:
    with _lock:
        for key, value in deltas.items():
            _totals[key] += value


def retrying(operation: str, url: str, call: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """`call()` under the retry policy; StorageError naming `operation` and `url` when it cannot succeed."""
    policy = policy or RETRY
    attempt = 0
    while True:
        _count(tries=1, retries=1 if attempt else 0)
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - sorted below: answers, transient, permanent, not storage
            _after_failure(operation, url, exc, attempt, policy)  # raises unless another try is due
            attempt += 1
            time.sleep(policy.pause(attempt))
            continue
        if attempt:
            _count(recovered=1)
        return result


def retrying_batch(operation: str, urls: Sequence[str], call: Callable[[list[int]], list[Any]],
                   policy: RetryPolicy | None = None) -> list[Any]:
    """One result per url from `call(indices)`, which tries the given indices together and returns, per index, a
    result or the exception it raised; only the failed ones are tried again (each counts as a try)."""
    policy = policy or RETRY
    out: list[Any] = [None] * len(urls)
    todo, tries = list(range(len(urls))), [0] * len(urls)
    while todo:
        _count(tries=len(todo), retries=sum(1 for i in todo if tries[i]))
        failed = []
        for i, result in zip(todo, call(todo)):
            if isinstance(result, BaseException):
                _after_failure(operation, urls[i], result, tries[i], policy)
                failed.append(i)
            else:
                out[i] = result
                if tries[i]:
                    _count(recovered=1)
            tries[i] += 1
        if failed:
            time.sleep(policy.pause(max(tries[i] for i in failed)))
        todo = failed
    return out


def _after_failure(operation: str, url: str, exc: BaseException, attempt: int, policy: RetryPolicy) -> None:
    """Re-raise what is not a transient storage failure (answers as they are, storage failures as
    StorageError); after a transient one, wait before the next try, or raise StorageError after the last."""
    if isinstance(exc, (FileNotFoundError, PreconditionFailed, ConditionalWritesUnsupported, StorageError)):
        if attempt and not isinstance(exc, StorageError):
            _count(recovered=1)  # an answer, after a retry
        raise exc
    kind = transient_kind(exc)
    if kind is None:
        if not is_storage_failure(exc):
            raise exc  # a bug, not the store's answer: keep its traceback
        _count(failed=1)
        raise StorageError(operation, url, describe(exc), permanent_reason(exc)) from exc
    _count(**{kind: 1})
    if attempt + 1 >= policy.attempts:
        _count(failed=1)
        reason = "endpoint_unreachable" if kind == "connection_errors" else "unavailable"
        raise StorageError(operation, url, f"{describe(exc)}; gave up after {policy.attempts} tries", reason) from exc
    log.info("storage %s of %s: %s; trying again (%d of %d)", operation, url, describe(exc), attempt + 2,
             policy.attempts)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (s3fs wraps botocore's ClientError in an OSError)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _http_error(exc: BaseException) -> tuple[int | None, str | None, str]:
    """(HTTP status, S3 error code, message) of a botocore ClientError; (None, None, "") for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None, None, ""
    error = response.get("Error") or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode"), error.get("Code"), error.get("Message", "")


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exception types of a connection that failed mid-call: reset, refused, timed out, cut short."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    try:
        import botocore.exceptions as b

        kinds += [b.HTTPClientError, b.ConnectionError, b.ResponseStreamingError, b.IncompleteReadError]
    except ImportError:  # no S3 support installed: only local errors can occur
        pass
    try:
        import aiohttp

        kinds += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    from fsspec.exceptions import FSTimeoutError

    return (*kinds, FSTimeoutError)


_CONNECTION_ERRORS = _connection_errors()


def transient_kind(exc: BaseException) -> str | None:
    """"throttled", "server_errors" or "connection_errors" for a failure that a later try may not meet; None
    for one that will recur (or is not a storage failure at all)."""
    for e in _chain(exc):
        status, code, _ = _http_error(e)
        if code in THROTTLING_CODES or status == 429:
            return "throttled"
        if status is not None and status >= 500:
            return "server_errors"
        if code in _TRANSIENT_4XX:
            return "connection_errors"
        if status is not None:
            return None  # the store answered: a 4xx other than the above is its final word
        if isinstance(e, _CONNECTION_ERRORS):
            return "connection_errors"
        if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE):
            return "connection_errors"
    return None


# botocore's exceptions for a client that found no (or half the) credentials; matched by name, as botocore is
# optional here and these are raised before any request is sent.
_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"})


def permanent_reason(exc: BaseException) -> str:
    """StorageError.reason of a failure no retry can fix: "no_credentials", "access_denied" (403) or
    "unavailable"."""
    for e in _chain(exc):
        if type(e).__name__ in _NO_CREDENTIALS:
            return "no_credentials"
        if _http_error(e)[0] == 403 or isinstance(e, PermissionError):
            return "access_denied"
    return "unavailable"


def is_storage_failure(exc: BaseException) -> bool:
    """Whether `exc` came from the store or the way to it (OSError, botocore, aiohttp), not from a bug."""
    if isinstance(exc, OSError) or _http_error(exc)[0] is not None:
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")


def describe(exc: BaseException) -> str:
    """One line saying what failed: "503 SlowDown: Please reduce your request rate." or "ClientOSError: ..."."""
    for e in _chain(exc):
        status, code, message = _http_error(e)
        if status is not None or code:
            named = f"{status} {code}" if code and code != str(status) else str(status or code)
            return f"{named}: {message}" if message else named
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
