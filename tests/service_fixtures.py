"""The query service's test world, shared by every module that talks to a running server (a pytest plugin, loaded
by conftest.py): one bank built and indexed once per session, one real uvicorn server on 127.0.0.1 serving it with
a bearer token, and the helpers to start more servers on it."""

from __future__ import annotations

import io
import os
import socket
import threading
import time

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
