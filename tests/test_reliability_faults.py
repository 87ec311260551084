"""Build, index and serve through the fault proxy (10–30% of S3 requests answered 503 / SlowDown / 500, reset, or
cut short, seeded): the bank is byte for byte the one a fault-free run makes, and queries get the same answers.

The default run keeps serving at 20%; builds and index runs at 10-30% (several seeds) and the HTTP service are slow.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import s3fs

from bank_builder.format import parts, storage
from bank_builder.index import build_index
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from query.bank import open_bank
from query.search import BankSearcher
from tests.build_helpers import tiny_config
from tests.index_helpers import make_bank
from tests.reliability_helpers import digest
from query.client import RefbankClient
from query.service import ServiceConfig, create_app
from tests.service_fixtures import INDEX, TOKEN, Server, png, wait_ready

pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("ray_local")]


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    """(direct storage options, bucket): one bucket for the module, reached without the proxy."""
    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    name = f"faults-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return options, name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two local shards of three 96 px images (the source is local: the bank is what goes through faults)."""
    root = tmp_path_factory.mktemp("faults")
    make_corpus(str(root / "corpus"), CorpusConfig(shards=2, samples_per_shard=3, image_size=96, seed=8))
    return str(root / "corpus" / "train-*.tar")


@pytest.fixture(scope="module")
def clean(bucket, corpus):
    """The fault-free bank, built straight on moto."""
    options, name = bucket
    url = f"s3://{name}/clean"
    assert build_bank(tiny_config(corpus, url, options)).ok
    return url


@pytest.fixture
def through(proxy_server, bucket):
    """Storage options of the module's bucket through the fault proxy (faults off again afterwards)."""
    options, _ = bucket
    proxy_server.reset()
    yield {**options, "endpoint_url": proxy_server.url}
    proxy_server.reset()


def build_through_faults(corpus: str, url: str, through: dict, proxy, rate: float, seed: int):
    """Build `url` with `rate` of the bank's requests failing; the build report."""
    proxy.faults(rate, seed=seed)
    report = build_bank(tiny_config(corpus, url, through))
    proxy.faults(0.0)
    return report


def _queries(url: str, options: dict, n: int, seed: int) -> np.ndarray:
    bank = open_bank(url, storage_options=options)
    ids = [p.ordinal << 32 | r for p in bank.manifest.parts for r in range(0, p.rows, 3)]
    rng = np.random.default_rng(seed)
    x = bank.visual_embeddings(rng.choice(ids, min(n, len(ids)), replace=False))
    x += 0.02 * rng.standard_normal(x.shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def answers(url: str, options: dict, queries: np.ndarray, k: int = 8) -> list:
    """What the service computes for each query: kNN ids and scores, the hits' metadata and labels."""
    bank = open_bank(url, storage_options=options)
    searcher = BankSearcher(bank)
    out = []
    for q in queries:
        scores, ids = searcher.search(q[None], k)
        hits = ids[0][ids[0] >= 0]
        out.append((ids.tolist(), scores.tolist(), bank.metadata(hits), bank.labels(ids[0])))
    return out


@pytest.fixture(scope="module")
def synthetic(bucket):
    """A synthetic indexed bank on moto with many objects to fetch: 3 parts of 256-row row groups (12 in all),
    IVF-Flat in 8 KiB list objects."""
    options, name = bucket
    url = f"s3://{name}/synthetic"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parts, "ROW_GROUP_SIZE", 256)
        make_bank(url, part_rows=(900, 1400, 700), dim=32, n_clusters=24, seed=4, storage_options=options)
    build_index(url, INDEX, options)
    return url


def test_serving_through_20_percent_faults_gives_the_clean_answers(synthetic, bucket, through, proxy_server,
                                                                    record_property):
    options, _ = bucket
    queries = _queries(synthetic, options, 16, seed=3)
    expected = answers(synthetic, options, queries)
    proxy_server.faults(0.2, seed=2)
    before = storage.counters()
    got = answers(synthetic, through, queries)  # open, list fetches, footers, row groups, labels: all faulted
    record_property("serve", {"requests": len(proxy_server.requests), "injected": dict(proxy_server.injected),
                              "storage": (storage.counters() - before).to_dict()})
    assert sum(proxy_server.injected.values()) >= 5, proxy_server.injected
    assert got == expected


@pytest.fixture(scope="module")
def indexed(clean, bucket):
    """The clean bank with its index (built straight on moto)."""
    options, _ = bucket
    build_index(clean, INDEX, options)
    return clean


@pytest.mark.slow
@pytest.mark.parametrize("rate,seed", [(0.1, 11), (0.2, 12), (0.3, 13), (0.3, 14)])
def test_build_index_and_serve_through_faults_give_the_clean_bank(indexed, corpus, bucket, through, proxy_server,
                                                                    rate, seed, record_property):
    options, name = bucket
    url = f"s3://{name}/sweep-{rate}-{seed}"
    report = build_through_faults(corpus, url, through, proxy_server, rate, seed)
    assert report.ok and report.version == "v000001" and report.storage["failed"] == 0
    record_property("build", {"requests": len(proxy_server.requests), "injected": dict(proxy_server.injected),
                              "driver_storage": report.storage, "shard_retries": report.shard_retries})
    assert sum(proxy_server.injected.values()) > 0, proxy_server.injected
    proxy_server.reset()
    proxy_server.faults(rate, seed=seed + 100)
    indexed_report = build_index(url, INDEX, through)
    proxy_server.faults(0.0)
    assert indexed_report.version == "v000002" and indexed_report.storage["failed"] == 0
    record_property("index", {"requests": len(proxy_server.requests), "injected": dict(proxy_server.injected),
                              "driver_storage": indexed_report.storage})
    assert sum(proxy_server.injected.values()) > 0, proxy_server.injected
    assert digest(url, options) == digest(indexed, options)
    queries = _queries(indexed, options, 10, seed=seed)
    proxy_server.reset()
    proxy_server.faults(rate, seed=seed + 200)
    got = answers(url, through, queries)
    record_property("serve", {"requests": len(proxy_server.requests), "injected": dict(proxy_server.injected)})
    assert got == answers(indexed, options, queries)


def _service_answers(client, images: list) -> list:
    """/v1/search (image) and open-set /v1/segment answers, without their timings."""
    out = []
    for image in images:
        search = client.search(image=png(image), k=10)
        segment = client.segment(png(image), mode="open_set", k=5)
        out.append((search["results"], segment["result"]))
    return out


@pytest.mark.slow
def test_the_service_through_20_percent_faults_answers_as_from_a_clean_bank(world, bucket, proxy_server, tmp_path,
                                                                            record_property):
    options, name = bucket
    fs = s3fs.S3FileSystem(**options)
    for root, _, files in os.walk(world["bank"]):  # the session's local bank, copied to S3 as is
        for file in files:
            local = os.path.join(root, file)
            fs.pipe_file(f"{name}/world/{os.path.relpath(local, world['bank'])}", open(local, "rb").read())
    images = [sample.image for sample in world["heldout"][:4]]
    servers = {}
    try:
        for which, bank, so in (("clean", world["bank"], {}),
                                ("faulty", f"s3://{name}/world", {**options, "endpoint_url": proxy_server.url})):
            config = ServiceConfig(bank=bank, storage_options=so, cache_dir=str(tmp_path / which), token=TOKEN)
            if which == "faulty":  # from the first request: loading the bank goes through faults too
                proxy_server.faults(0.2, seed=21)
                rules = [proxy_server.rule("GET", f"/{name}/world/{pattern}", fault) for pattern, fault in
                         (("CURRENT", "slowdown"), ("parts/.*parquet", "truncate"), ("index/", "internal"))]
            servers[which] = Server(create_app(config))
            wait_ready(RefbankClient(servers[which].url, token=TOKEN, timeout=60))
        clients = {which: RefbankClient(s.url, token=TOKEN, timeout=120) for which, s in servers.items()}
        assert _service_answers(clients["faulty"], images) == _service_answers(clients["clean"], images)
        record_property("service", {"requests": len(proxy_server.requests), "injected": dict(proxy_server.injected)})
        assert [rule.hits for rule in rules] == [1, 1, 1]  # CURRENT, a part and an index object met a fault
    finally:
        proxy_server.reset()
        for s in servers.values():
            s.stop()
