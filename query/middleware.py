"""HTTP plumbing of the query service: JSON errors, the request-body limit, and Prometheus metrics.

Errors are JSON {"error": code, "detail": message, ...}; `install_error_handlers` maps the service's ApiError,
pydantic validation errors (422), Starlette HTTP errors, a damaged bank (503 storage_corrupt) or an unreachable
one (503 storage_unavailable) met outside a request's own guard, ValueError from the segmenter (400) and anything
else (500) to that shape. `BodyLimit` answers 413 for an oversized body; `MetricsMiddleware` counts requests and
times them per endpoint (route template); `StateCollector` exports the list cache, the worker pools, damaged
objects met and the bank being served.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bank_builder.format import BankFormatError, StorageError
from query.admission import WorkPool
from query.lists import BudgetTooSmall
from query.serving import CACHE_COUNTERS, ApiError, ServiceState

log = logging.getLogger("refbank.service")


class SafeJSONResponse(JSONResponse):
    """JSON with NaN / ±inf written as null (plain JSON has no such numbers)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:
            return super().render(_finite(content))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------- errors


def error_response(status: int, code: str, detail: Any, headers: dict[str, str] | None = None,
                   **extra: Any) -> SafeJSONResponse:
    headers = {"WWW-Authenticate": "Bearer", **(headers or {})} if status == 401 else headers
    return SafeJSONResponse({"error": code, "detail": detail, **extra}, status_code=status, headers=headers)


def validation_detail(errors: list[dict[str, Any]], prefix: str) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in (prefix, *e['loc']) if p != '')}: {e['msg']}" for e in errors)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.detail, exc.headers, **exc.extra)

    async def storage_failure(request: Request, exc: BankFormatError | StorageError | OSError) -> Response:
        return await api_error(request, request.app.state.service.storage_error(exc))

    async def invalid_options(request: Request, exc: ValidationError) -> Response:
        return error_response(422, "invalid_options", validation_detail(exc.errors(), "options"))

    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_request", validation_detail(list(exc.errors()), ""))

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, exc.detail)

    async def bad_value(request: Request, exc: ValueError) -> Response:
        return error_response(400, "bad_request", str(exc))

    async def budget_too_small(request: Request, exc: BudgetTooSmall) -> Response:
        return error_response(503, "budget_too_small", str(exc))

    async def internal(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    for kind, handler in ((ApiError, api_error), (ValidationError, invalid_options),
                          (RequestValidationError, invalid_request), (StarletteHTTPException, http_error),
                          (BudgetTooSmall, budget_too_small), (BankFormatError, storage_failure),
                          (StorageError, storage_failure), (OSError, storage_failure), (ValueError, bad_value), (Exception, internal)):
        app.add_exception_handler(kind, handler)


# ----------------------------------------------------------------------------------------- middleware


class BodyLimit:
    """413 for a request body over `limit` bytes, from Content-Length or while the body is read.

    A body up to `limit + drain` bytes is read to its end (and dropped) before the 413 goes out, so an ordinary
    client that sends its whole body before reading sees the answer instead of a connection reset; a larger one
    is answered at once and its connection closed."""

    def __init__(self, app: Any, limit: int, drain: int | None = None) -> None:
        self.app, self.limit = app, limit
        self.drain = limit if drain is None else drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                answer = error_response(400, "bad_request", "Content-Length is not a number")
                return await answer(scope, receive, send)
            if declared > self.limit:
                if declared <= self.limit + self.drain:
                    await self._skip_rest(receive, 0)
                return await error_response(413, "payload_too_large", self._detail(declared))(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                if message.get("more_body", False):
                    await self._skip_rest(receive, received)
                raise ApiError(413, "payload_too_large", self._detail(f"more than {self.limit}"))
            return message

        await self.app(scope, limited, send)

    async def _skip_rest(self, receive: Any, received: int) -> None:
        """Read and drop the rest of the body, up to limit + drain bytes in all."""
        while received <= self.limit + self.drain:
            message = await receive()
            received += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    def _detail(self, size: Any) -> str:
        return (f"request body is {size} bytes; this server takes at most {self.limit} "
                "(max_upload_bytes): send a smaller or downscaled image")


class Metrics:
    """Request counters and latency histograms per endpoint (route template), in a registry of the app's own."""

    def __init__(self, registry: CollectorRegistry, state: ServiceState, pools: dict[str, WorkPool]) -> None:
        self.requests = Counter("refbank_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=registry)
        self.latency = Histogram("refbank_http_request_duration_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.in_flight = Gauge("refbank_http_requests_in_flight", "HTTP requests being served", registry=registry)
        registry.register(StateCollector(state, pools))


class MetricsMiddleware:
    def __init__(self, app: Any, metrics: Metrics, paths: set[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.paths else "other")
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.in_flight.dec()


_CACHE_HELP = {
    "hits": "probed inverted lists that were resident when searched",
    "misses": "inverted lists fetched from the bank", "fetch_requests": "ranged reads of list objects",
    "bytes_fetched": "bytes read from the bank's list objects", "evictions": "inverted lists evicted from memory",
    "compactions": "rebuilds of the inverted lists that gave evicted lists' memory back",
    "fetch_seconds": "seconds spent reading lists from the bank",
}


class StateCollector:
    """List-cache counters (summed over every version served) and gauges, the worker pools, damaged bank objects
    met, and the bank being served."""

    def __init__(self, state: ServiceState, pools: dict[str, WorkPool]) -> None:
        self.state, self.pools = state, pools

    def describe(self) -> list:
        return []  # collected fresh at every scrape

    def collect(self):
        stats = self.state.cache_stats()
        for key in CACHE_COUNTERS:
            name = {"bytes_fetched": "fetched_bytes"}.get(key, key)
            yield CounterMetricFamily(f"refbank_list_cache_{name}", _CACHE_HELP[key], value=stats.get(key, 0))
        for key, name, doc in (("resident_bytes", "resident_bytes", "bytes of inverted lists held in memory"),
                               ("leaked_bytes", "leaked_bytes", "memory of evicted lists faiss still holds "
                                                                "(given back at the next compaction)"),
                               ("resident_lists", "resident_lists", "inverted lists held in memory"),
                               ("memory_bytes", "memory_budget_bytes", "memory budget of the list cache"),
                               ("index_bytes", "index_bytes", "memory the whole index would take")):
            yield GaugeMetricFamily(f"refbank_list_cache_{name}", doc, value=stats.get(key, 0))
        if "disk_bytes" in stats:  # the process-wide disk tier (not summed over versions: it is one)
            for key, doc in (("disk_hits", "lists read from the local disk tier"),
                             ("disk_writes", "lists written to the local disk tier"),
                             ("disk_evictions", "files deleted to keep the disk tier under its limit"),
                             ("disk_corrupt", "damaged disk-tier files removed and fetched again")):
                yield CounterMetricFamily(f"refbank_list_cache_{key}", doc, value=stats[key])
            for key, doc in (("disk_bytes", "bytes in the local disk tier"),
                             ("disk_limit_bytes", "byte limit of the local disk tier")):
                yield GaugeMetricFamily(f"refbank_list_cache_{key}", doc, value=stats[key])
        yield GaugeMetricFamily("refbank_ready", "1 when the bank and its encoder are loaded",
                                value=int(self.state.ready))
        reloads = CounterMetricFamily("refbank_reloads", "version switches by outcome (followed: a new CURRENT that "
                                      "--follow noticed, also counted as ok; kept: CURRENT has no index and the "
                                      "newest indexed version is served already)", labels=["outcome"])
        for outcome in ("ok", "followed", "kept", "unknown_version", "refused"):
            reloads.add_metric([outcome], self.state.reloads[outcome])
        yield reloads
        corrupt = CounterMetricFamily("refbank_storage_corrupt", "requests that met a damaged bank object, by object",
                                      labels=["object"])
        for name, count in self.state.corruptions.copy().items():
            corrupt.add_metric([name], count)
        yield corrupt
        yield from self._pools()
        if self.state.ready:
            bank = self.state.live.bank
            info = GaugeMetricFamily("refbank_bank_info", "the bank version served (value 1)",
                                     labels=["version", "encoder", "untrained"])
            info.add_metric([bank.version, bank.spec.name, str(bank.spec.untrained).lower()], 1)
            yield info
            yield GaugeMetricFamily("refbank_bank_segments", "segments in the version served",
                                    value=bank.manifest.totals.get("segments", 0))
            yield GaugeMetricFamily("refbank_bank_degraded", "1 when requests met damaged objects of the version "
                                    "served (see /readyz)", value=int(bool(self.state.live.corrupt)))

    def _pools(self):
        stats = {name: pool.stats() for name, pool in self.pools.items()}
        for key, kind, doc in (("running", GaugeMetricFamily, "calls running in the pool"),
                               ("queued", GaugeMetricFamily, "admitted calls waiting for a worker"),
                               ("workers", GaugeMetricFamily, "worker threads of the pool"),
                               ("refused", CounterMetricFamily, "requests refused with 429 (pool full)"),
                               ("completed", CounterMetricFamily, "calls completed")):
            family = kind(f"refbank_pool_{key}", doc, labels=["pool"])
            for name, values in stats.items():
                family.add_metric([name], values[key])
            yield family
