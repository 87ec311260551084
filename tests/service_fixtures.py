"""The query service's test world, shared by every module that talks to a running server (a pytest plugin, loaded
by conftest.py): one bank built and indexed once per session, one real uvicorn server on 127.0.0.1 serving it with
a bearer token, the helpers to start more servers on it (or on a copy of it), and raw HTTP helpers."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from typing import Iterator

import numpy as np
import pytest
import uvicorn
from PIL import Image

from bank_builder.config import IngestConfig
from bank_builder.index import IndexConfig, build_index
from bank_builder.ingest import iter_samples
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, class_names, make_corpus
from query.client import RefbankClient, RefbankError
from query.service import ServiceConfig, create_app
from tests.build_helpers import tiny_config

NAMES = list(class_names())
TOKEN = "test-token-123"
MAX_UPLOAD = 1 << 20
INDEX = IndexConfig(autotune_queries=50, nprobe_candidates=(1, 4, 16), object_bytes=8 << 10)  # IVF-Flat
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def world(tmp_path_factory, ray_local):
    """A bank of 2×16 generated 128 px images (v000001), indexed (v000002); the 16 held-out samples."""
    root = tmp_path_factory.mktemp("service")
    summary = make_corpus(str(root / "corpus"), CorpusConfig(shards=2, samples_per_shard=16, image_size=128,
                                                             heldout_shards=1, seed=5))
    bank = str(root / "bank")
    assert build_bank(tiny_config(str(root / "corpus" / "train-*.tar"), bank)).ok
    assert build_index(bank, INDEX).version == "v000002"
    heldout = list(iter_samples(summary.heldout[0], IngestConfig()))
    return {"root": root, "bank": bank, "heldout": heldout}


class Server:
    """uvicorn on 127.0.0.1, a free port, in a daemon thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="session")
def server(world):
    config = ServiceConfig(bank=world["bank"], cache_dir=str(world["root"] / "cache"), max_upload_bytes=MAX_UPLOAD,
                           max_k=64, max_vocabulary=16, token=TOKEN)
    running = Server(create_app(config))
    wait_ready(RefbankClient(running.url, token=TOKEN, timeout=60))
    yield running
    running.stop()


def wait_ready(client: RefbankClient, seconds: float = 90) -> None:
    """Return once /readyz says ready (the encoder and the bank are loaded; /healthz answers at once)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ready()
            return
        except RefbankError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not get ready: {exc}")
            time.sleep(0.2)


@pytest.fixture
def client(server):
    return RefbankClient(server.url, token=TOKEN, timeout=60)


@contextlib.contextmanager
def serving(config: ServiceConfig) -> Iterator[tuple[Server, RefbankClient]]:
    """Another real server (loaded, ready) with its client, stopped on exit."""
    running = Server(create_app(config))
    try:
        client = RefbankClient(running.url, token=config.token, timeout=60)
        wait_ready(client)
        yield running, client
    finally:
        running.stop()


def copy_bank(world: dict, target) -> str:
    """A copy of the session bank (every version, part and index object) to damage or republish, at `target`."""
    shutil.copytree(world["bank"], target)
    return str(target)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height RGB pixels (the data is a few zero bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def multipart(files: dict[str, bytes], fields: dict[str, str]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request with these file parts and text fields."""
    boundary = "refbank-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.bin"\r\n\r\n'.encode()
             + v + b"\r\n" for k, v in files.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
              for k, v in fields.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def raw(url: str, path: str, body: bytes | None = None, content_type: str | None = None, token: str | None = TOKEN,
        method: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one plain urllib request; an HTTP error status is returned, not raised."""
    headers = {"Content-Type": content_type} if content_type else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def playwright():
    """playwright's sync_playwright, or a skip saying what to install (it drives Debian's /usr/bin/chromium)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is absent: pip install playwright==1.65.2 (never `playwright install`: the test "
                    "drives Debian's /usr/bin/chromium)")
    return sync_playwright
