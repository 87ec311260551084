"""A bank's day, end to end on a generated corpus, with a real server following CURRENT under a steady stream of
queries: build + index → add a shard → incremental index → remove a shard → compact → gc. Nothing fails, new
segments are found, removed ones vanish on the next request, compaction changes no answer."""

from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
import pytest

from bank_builder.format import BankRef, list_versions, read_manifest, storage
from bank_builder.index import build_index
from bank_builder.index.compact import compact_index
from bank_builder.lifecycle import Removal, collect_garbage, remove_segments
from bank_builder.lifecycle.gc import referenced_objects
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from query.client import RefbankClient
from query.service import ServiceConfig, create_app
from tests.build_helpers import read_bank, tiny_config
from tests.service_fixtures import INDEX, Server, wait_ready

pytestmark = pytest.mark.usefixtures("ray_local")


def _unit(row) -> np.ndarray:
    vector = np.asarray(row.as_py(), np.float32)
    return vector / np.linalg.norm(vector)


def _wait_for_version(client: RefbankClient, version: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while client.bank()["version"] != version:
        assert time.monotonic() < deadline, f"the server did not follow CURRENT to {version}"
        time.sleep(0.1)


def test_a_following_server_serves_every_step_of_a_refresh_without_a_failed_request(tmp_path):
    root = tmp_path
    make_corpus(str(root / "corpus"), CorpusConfig(shards=2, samples_per_shard=8, image_size=96, seed=21))
    make_corpus(str(root / "more"), CorpusConfig(shards=1, samples_per_shard=8, image_size=96, seed=22))
    bank, ref = str(root / "bank"), BankRef(str(root / "bank"))
    first = f"{root}/corpus/train-*.tar"
    assert build_bank(tiny_config(first, bank)).ok and build_index(bank, INDEX).version == "v000002"
    old_rows = read_bank(bank)
    server = Server(create_app(ServiceConfig(bank=bank, cache_dir=str(root / "cache"), follow_seconds=0.1)))
    client = RefbankClient(server.url, timeout=60)
    wait_ready(client)
    probe = _unit(old_rows["visual_embedding"][0])
    failures, answers, stop = [], [0], threading.Event()

    def steady_queries() -> None:  # a stream of searches through every switch of version
        while not stop.is_set():
            try:
                client.search(vector=probe, k=5)
                answers[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                failures.append(repr(exc))

    stream = threading.Thread(target=steady_queries, daemon=True)
    stream.start()
    try:
        # A new shard: the build publishes v3 with the old index (still serving), the index adds a delta (v4).
        assert build_bank(tiny_config(f"{{{first},{root}/more/train-000000.tar}}", bank)).version == "v000003"
        _wait_for_version(client, "v000003")
        indexed = build_index(bank, INDEX)
        assert indexed.mode == "delta" and indexed.version == "v000004"
        _wait_for_version(client, "v000004")
        new_rows = read_bank(bank).slice(old_rows.num_rows)
        hit = client.search(vector=_unit(new_rows["visual_embedding"][0]), k=1)["results"][0]
        assert hit["segment_id"] == new_rows["segment_id"][0].as_py()  # a new segment is found
        assert client.search(vector=probe, k=1)["results"][0]["segment_id"] == old_rows["segment_id"][0].as_py()

        # A takedown of a whole shard: its segments vanish from the next request after the switch.
        gone = read_manifest(ref).parts[0]
        assert remove_segments(bank, Removal(shards=(gone.source,), reason="takedown")).version == "v000005"
        _wait_for_version(client, "v000005")
        ids = {r["segment_id"] for r in client.search(vector=probe, k=50)["results"]}
        assert not any(i >> 32 == gone.ordinal for i in ids)

        # Compaction changes no answer.
        queries = [_unit(row) for row in old_rows["visual_embedding"][::7]]
        before = [[r["segment_id"] for r in client.search(vector=q, k=5)["results"]] for q in queries]
        assert compact_index(bank).version == "v000006"
        _wait_for_version(client, "v000006")
        assert [[r["segment_id"] for r in client.search(vector=q, k=5)["results"]] for q in queries] == before

        # Garbage collection keeps what the served version uses; the service keeps answering.
        fs, path = ref.fs()
        existing = {p[len(path) + 1:] for p in fs.find(path)}
        report = collect_garbage(bank, keep=1, grace_s=0)
        assert report.deleted and list_versions(ref) == ["v000006"]
        assert all(storage.exists(ref.url(name)) for name in referenced_objects(read_manifest(ref)) & existing)
        assert client.search(vector=probe, k=3)["results"]
        followed = urllib.request.urlopen(f"{server.url}/metrics").read().decode()
        assert 'refbank_reloads_total{outcome="followed"} 4.0' in followed  # v3, v4, v5, v6
    finally:
        stop.set()
        stream.join(timeout=60)
        server.stop()
    assert not failures, failures[:3]
    assert answers[0] > 20
