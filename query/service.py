"""HTTP API of one reference bank (FastAPI): segment an image, search the bank, describe it, reload a version.

    POST /v1/segment   multipart: `image` file, `options` JSON (SegmentOptions), reference images / masks as
                       more files → SegmentResponse JSON, or one PNG (label map / overlay)
    POST /v1/search    multipart (`image` file + `options`) or JSON (SearchOptions: text / vector) → top-k hits
    GET  /v1/bank      version, encoder spec (untrained flag), totals, index parameters, cache statistics
    GET  /v1/labels    the bank's labels with their segment counts and overlay colours (most frequent first)
    POST /admin/reload switch to another bank version (default CURRENT) without dropping a request
    GET  /healthz      the process is up;  GET /readyz  the bank and encoder are loaded (503 until then)
    GET  /metrics      Prometheus: requests and latency per endpoint, list-cache counters and gauges
    GET  /             a page to try it in a browser;  /docs (Swagger UI), /redoc, /openapi.json  the API
                       description; /static/…  the page's files and the vendored docs front ends (no CDN)

Every error is JSON {"error": code, "detail": message} with a 4xx status for anything the client can fix, 503 for
what the server or its bank cannot do now (not_ready, storage_corrupt naming the damaged object,
storage_unavailable, budget_too_small). Work runs in two bounded pools (query.admission): image requests
(segment, image search) and queries (text / vector search, bank, labels); a full pool answers 429 with
Retry-After. Encoder forwards run one at a time. With a token configured, /v1/* and /admin/* need
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.staticfiles import StaticFiles

from query.admission import PoolConfig, WorkPool
from query.api_models import (
    BankResponse,
    ErrorResponse,
    LabelsResponse,
    ReloadRequest,
    SearchOptions,
    SearchResponse,
    SegmentOptions,
    SegmentResponse,
    parse_options,
)
from query.answers import bank_answer, labels_answer, search_answer, segment_answer
from query.middleware import BodyLimit, Metrics, MetricsMiddleware, SafeJSONResponse, install_error_handlers
from query.serving import ApiError, ServiceConfig, ServiceState, Snapshot

__all__ = ["ApiError", "ServiceConfig", "create_app", "serve"]

log = logging.getLogger("refbank.service")

STATIC = "/static"  # where query/static/ is served: the page's files, the vendored Swagger UI and ReDoc
# The browser pages load nothing from outside this server, and the browser enforces it: ReDoc's bundle would fetch
# its sidebar logo from cdn.redoc.ly (it hides the image when that fails).
LOCAL_ONLY = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' "
                                         "'unsafe-inline'; script-src 'self' 'unsafe-inline'; worker-src 'self' blob:"}
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 415, 422, 429, 503)}


# ----------------------------------------------------------------------------------------- the app


def create_app(config: ServiceConfig) -> FastAPI:
    """The service for `config.bank`. Loading (encoder + bank) starts in a background thread when the server
    starts, so /healthz answers at once and /readyz turns 200 when loaded; call `app.state.service.load()`
    first to load before serving (as `serve` does)."""
    state = ServiceState(config)
    registry = CollectorRegistry()
    pools = {"image": WorkPool("image", PoolConfig(config.image_workers, config.image_queue)),
             "query": WorkPool("query", PoolConfig(config.query_workers, config.query_queue))}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not state.ready:
            threading.Thread(target=_load_logged, args=(state,), name="refbank-load", daemon=True).start()
        if config.follow_seconds:
            state.follow(config.follow_seconds)
        yield
        state.close()
        for pool in pools.values():
            pool.shutdown()

    app = FastAPI(title="refbank", version="1", lifespan=lifespan, default_response_class=SafeJSONResponse,
                  description="Retrieval segmentation over a reference bank. Errors: {error, detail}.",
                  docs_url=None, redoc_url=None)  # served by `pages` from the installed static files
    app.state.service, app.state.registry, app.state.pools = state, registry, pools
    static = resources.files("query").joinpath("static")
    app.state.page = static.joinpath("index.html").read_text(encoding="utf-8")
    for router in (pages, probes, api, admin):
        app.include_router(router)
    app.mount(STATIC, StaticFiles(directory=str(static)), name="static")
    install_error_handlers(app)
    paths = {route.path for router in (pages, probes, api, admin) for route in router.routes}
    paths |= {app.openapi_url}
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=Metrics(registry, state, pools), paths=paths)  # outermost
    return app


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          on_listening: Callable[[str, Snapshot], None] | None = None) -> None:
    """Load the bank and its encoder (failing fast with the loader's message), listen on host:port (0: a free
    port), call `on_listening(url, snapshot)` once connections queue, then serve with uvicorn until stopped."""
    import uvicorn

    app = create_app(config)
    snapshot = app.state.service.load()
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    log.info("listening on %s (the page is at %s/, the API at %s/docs)", url, url, url)
    if on_listening is not None:
        on_listening(url, snapshot)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=bound, log_level=log_level)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the signal again after its clean shutdown: a stop, not a failure
        log.info("stopped")


def _load_logged(state: ServiceState) -> None:
    try:
        state.load()
    except Exception:
        log.exception("loading bank %s failed; /readyz reports it", state.config.bank)


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _pool(request: Request, name: str) -> WorkPool:
    return request.app.state.pools[name]


_bearer = HTTPBearer(auto_error=False, description="needed when the server runs with a token")


async def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """401 unless the request carries the configured bearer token (no token configured: open)."""
    token = _state(request).config.token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token; send the header "
                                            "'Authorization: Bearer <token>'")


pages = APIRouter(include_in_schema=False)
probes = APIRouter(tags=["probes"])
api = APIRouter(prefix="/v1", tags=["bank"], dependencies=[Depends(require_token)], responses=ERRORS)
admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_token)], responses=ERRORS)


@pages.get("/")
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page, headers=LOCAL_ONLY)


@pages.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    html = get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url, title="refbank API",
        swagger_js_url=f"{root}{STATIC}/vendor/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC}/vendor/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC}/vendor/swagger-ui/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None})  # no badge fetched from validator.swagger.io
    return HTMLResponse(html.body, headers=LOCAL_ONLY)


@pages.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    html = get_redoc_html(openapi_url=root + request.app.openapi_url, title="refbank API", with_google_fonts=False,
                          redoc_js_url=f"{root}{STATIC}/vendor/redoc/redoc.standalone.js",
                          redoc_favicon_url=f"{root}{STATIC}/vendor/swagger-ui/favicon-32x32.png")
    return HTMLResponse(html.body, headers=LOCAL_ONLY)


@probes.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@probes.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> dict[str, Any]:
    """200 once the bank and its encoder are loaded (`note`: why the version served is not CURRENT); 503 while
    loading or after a failed load (not_ready, with the reason), or once requests met damaged bank objects
    (storage_corrupt, `objects`: name → what is wrong) until a reload."""
    snapshot = _state(request).live
    if snapshot.corrupt:
        damaged = dict(snapshot.corrupt)
        raise ApiError(503, "storage_corrupt", f"version {snapshot.bank.version} is served, but {len(damaged)} "
                                               f"damaged bank object(s) were met: {', '.join(damaged)}. Restore "
                                               "them (or rebuild), then POST /admin/reload",
                       objects=damaged, version=snapshot.bank.version)
    return {"status": "ready", "version": snapshot.bank.version, "encoder": snapshot.bank.spec.name,
            "untrained": snapshot.bank.spec.untrained, "note": snapshot.note}


@probes.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


def _multipart(options: type[BaseModel], example: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """OpenAPI request body of a multipart endpoint whose `options` field is a JSON string of `options`."""
    fields = {"image": {"type": "string", "format": "binary", "description": "the image file (PNG, JPEG, ...)"},
              "options": {"type": "string", "description": f"JSON object: {options.__name__} (x-options-schema)",
                          "example": json.dumps(example)}}
    body = {"multipart/form-data": {"schema": {"type": "object", "properties": fields, "required": required,
                                               "additionalProperties": {"type": "string", "format": "binary"}}}}
    if options is SearchOptions:
        body["application/json"] = {"schema": options.model_json_schema()}
    return {"requestBody": {"required": True, "content": body}, "x-options-schema": options.model_json_schema()}


@api.post("/segment", response_model=None, responses={200: {"model": SegmentResponse,
                                                            "content": {"image/png": {}}}},
          openapi_extra=_multipart(SegmentOptions, {"mode": "vocabulary", "classes": ["cat", "grass"],
                                                    "return": ["json", "overlay"]}, ["image"]))
async def segment(request: Request) -> Response:
    """Segment the `image` file. Modes: vocabulary (`classes`), open_set, reference (`references`: each names a
    form file holding its image and gives a box, scribble or a mask file), foreground."""
    state = _state(request)
    config = state.config
    form = await _read_form(request, max_files=2 + 2 * config.max_references)
    try:
        options = parse_options(form.get("options"), SegmentOptions, config.max_json_bytes)
        if options.classes is not None and len(options.classes) > config.max_vocabulary:
            raise ApiError(422, "limit_exceeded", f"{len(options.classes)} classes; this server takes at most "
                                                  f"{config.max_vocabulary} per request")
        if len(options.references) > config.max_references:
            raise ApiError(422, "limit_exceeded", f"{len(options.references)} references; at most "
                                                  f"{config.max_references}")
        _check_k(options.k, config)
        names = ["image"]
        if options.mode == "reference":
            names += [n for r in options.references for n in (r.image, r.mask) if n is not None]
        files = await _read_files(form, names)
    finally:
        await form.close()
    # Admitted once the body is read: a slow upload holds a connection, never a place in the pool.
    async with _pool(request, "image").admit() as run:
        return await run(segment_answer, state, state.live, files, options)


@api.post("/search", response_model=SearchResponse,
          openapi_extra=_multipart(SearchOptions, {"k": 10, "box": [0, 0, 64, 64]}, []))
async def search(request: Request) -> Any:
    """Top-k bank segments nearest to one query: an `image` file (the whole image, or `box`, mean-pooled as the
    bank pools segments), `text` (matched to bank labels; their visual prototype is searched) or `vector`."""
    state = _state(request)
    image, limit = None, state.config.max_json_bytes
    if request.headers.get("content-type", "").startswith("application/json"):
        options = parse_options(await _read_json(request, limit), SearchOptions, limit)
    else:
        form = await _read_form(request, max_files=1)
        try:
            options = parse_options(form.get("options") or "{}", SearchOptions, limit)
            if form.get("image") is not None:
                image = (await _read_files(form, ["image"]))["image"]
        finally:
            await form.close()
    _check_search(options, image, state.config)
    async with _pool(request, "query" if image is None else "image").admit() as run:
        return await run(search_answer, state, state.live, image, options)


@api.get("/bank", response_model=BankResponse)
async def bank_info(request: Request) -> dict[str, Any]:
    """The live bank version: encoder spec (untrained flag), totals, index parameters, cache statistics."""
    state = _state(request)
    async with _pool(request, "query").admit() as run:
        return await run(bank_answer, state, state.live, {n: p.stats() for n, p in request.app.state.pools.items()})


@api.get("/labels", response_model=LabelsResponse)
async def bank_labels(request: Request,
                      prefix: str = Query("", description="only labels starting with this (case-insensitive)"),
                      limit: int = Query(1000, ge=1, le=100_000, description="at most this many, most frequent first")
                      ) -> dict[str, Any]:
    """The bank's labels (the names vocabulary mode matches classes to), each with its segment count and overlay
    colour, most frequent first; `total` counts every label matching `prefix`."""
    async with _pool(request, "query").admit() as run:
        return await run(labels_answer, _state(request).live, prefix, limit)


@admin.post("/reload")
async def reload(request: Request, version: str | None = Query(None, description="default: the bank's CURRENT")
                 ) -> dict[str, Any]:
    """Serve another bank version (body {"version": ...} or ?version=; default CURRENT, or while CURRENT has no
    index the newest version that has one, `note` saying so). The new version is loaded off to the side and
    swapped in; requests in flight finish on the old one. 404 for an unknown version (with the available ones),
    409 when its encoder or index cannot be served here, 503 storage_corrupt when a bank object is damaged."""
    state = _state(request)
    body = await _read_json(request, state.config.max_json_bytes)
    if body.strip():
        version = parse_options(body, ReloadRequest, state.config.max_json_bytes).version or version
    start = time.perf_counter()
    previous, current, note = await run_in_threadpool(state.reload, version)
    return {"previous": previous, "version": current, "seconds": round(time.perf_counter() - start, 3),
            "note": note}


# ----------------------------------------------------------------------------------------- request parsing


async def _read_form(request: Request, max_files: int) -> FormData:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data: an 'image' file and an 'options' "
                                                      "field holding a JSON object")
    return await request.form(max_files=max_files, max_fields=8, max_part_size=1 << 20)


async def _read_json(request: Request, limit: int) -> bytes:
    """The body of a JSON request, kept only up to `limit` bytes (max_json_bytes): a longer one is read to its end
    (the upload limit still applies) and dropped, then answered 413, so it never costs more memory than that."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise ApiError(413, "payload_too_large", f"the JSON body is {size} bytes; this server takes at most {limit} "
                                                 "(max_json_bytes)")
    return b"".join(chunks)


async def _read_files(form: FormData, names: list[str]) -> dict[str, bytes]:
    out = {}
    for name in dict.fromkeys(names):
        value = form.get(name)
        if value is None:
            raise ApiError(422, "missing_file", f"the form has no file field {name!r}; add it "
                                                "(multipart/form-data, a file part)")
        if not isinstance(value, UploadFile):
            raise ApiError(422, "missing_file", f"form field {name!r} must be a file upload, not a text field")
        out[name] = await value.read()
    return out


def _check_search(options: SearchOptions, image: bytes | None, config: ServiceConfig) -> None:
    given = [name for name, value in (("image", image), ("text", options.text), ("vector", options.vector))
             if value is not None]
    if len(given) != 1:
        raise ApiError(422, "invalid_options", f"give exactly one query: an image file, text or vector; got "
                                               f"{' and '.join(given) or 'none'}")
    if options.box is not None and image is None:
        raise ApiError(422, "invalid_options", "box applies to an image query; send the image file too")
    _check_k(options.k, config)


def _check_k(k: int | None, config: ServiceConfig) -> None:
    if k is not None and k > config.max_k:
        raise ApiError(422, "limit_exceeded", f"k={k} is above this server's max_k={config.max_k}")
