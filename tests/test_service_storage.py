"""The query service over a damaged or half-published bank (a copy of the session bank): damaged objects answer 503
storage_corrupt naming them, are counted in /metrics and turn /readyz to 503 until a reload; a CURRENT that names no
version is said so; a bank whose CURRENT has no index yet is served at its newest indexed version, saying so."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from prometheus_client.parser import text_string_to_metric_families

from bank_builder.format import BankFormatError, BankRef, publish, read_current, read_manifest
from query.client import RefbankError
from query.serving import ServiceConfig, ServiceState
from tests.build_helpers import read_bank
from tests.service_fixtures import TOKEN, copy_bank, multipart, png, raw, serving


def corrupt_counts(client) -> dict[str, float]:
    """refbank_storage_corrupt_total by object."""
    return {s.labels["object"]: s.value for f in text_string_to_metric_families(client.metrics())
            for s in f.samples if s.name == "refbank_storage_corrupt_total"}


def tear_pages(path: str, column: str) -> None:
    """Overwrite 50 bytes inside `column`'s first column chunk with noise; the footer stays intact."""
    chunk = next(c for c in (pq.ParquetFile(path).metadata.row_group(0).column(j) for j in range(14))
                 if c.path_in_schema == column)
    start = (chunk.dictionary_page_offset or chunk.data_page_offset) + 40
    data = bytearray(open(path, "rb").read())
    data[start:start + 50] = np.random.default_rng(0).integers(0, 256, 50, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))


def error(status_and_body) -> tuple[int, dict]:
    status, _, body = status_and_body
    return status, json.loads(body)


def test_damaged_objects_answer_503_storage_corrupt_naming_them(world, tmp_path):
    bank = copy_bank(world, tmp_path / "bank")
    ref = BankRef(bank)
    manifest = read_manifest(ref)
    first, second = (f"parts/{p.name}.parquet" for p in manifest.parts[:2])
    pristine = {name: open(f"{bank}/{name}", "rb").read() for name in (first, second)}
    table = read_bank(bank)
    vector_of = {}  # a bank vector of each part: a vector query finds its own segment first
    for name in (first, second):
        row = table["part"].to_pylist().index(name.removeprefix("parts/").removesuffix(".parquet"))
        vector = np.asarray(table["visual_embedding"][row].as_py(), np.float32)
        vector_of[name] = (vector / np.linalg.norm(vector)).tolist()
    with serving(ServiceConfig(bank=bank, token=TOKEN)) as (server, client):
        assert client.ready()["status"] == "ready"  # no part read yet: the bank caches what it reads, checked
        # Part 0: data pages torn (footer intact); part 1: truncated (its footer is gone).
        tear_pages(f"{bank}/{first}", "label")
        open(f"{bank}/{second}", "wb").write(pristine[second][:len(pristine[second]) // 2])
        for name in (first, second):
            with pytest.raises(RefbankError) as caught:
                client.search(vector=vector_of[name], k=1)
            assert (caught.value.status, caught.value.error) == (503, "storage_corrupt")
            assert caught.value.body["object"] == name and name in caught.value.detail
        status, answer = error(raw(server.url, "/v1/segment", *multipart(
            {"image": png(world["heldout"][0].image)}, {"options": '{"mode": "open_set", "k": 5}'})))
        assert (status, answer["error"]) == (503, "storage_corrupt") and answer["object"] in (first, second)
        status, answer = error(raw(server.url, "/readyz", token=None))
        assert (status, answer["error"]) == (503, "storage_corrupt") and {first, second} <= set(answer["objects"])
        counts = corrupt_counts(client)
        assert counts[first] >= 1 and counts[second] >= 1
        # Restored, then a reload clears the record; a list object with flipped bytes is named next.
        for name in (first, second):
            open(f"{bank}/{name}", "wb").write(pristine[name])
        lists = f"index/{manifest.index.id}/{manifest.index.lists[-1].object}"
        data = np.frombuffer(open(f"{bank}/{lists}", "rb").read(), np.uint8).copy()
        data[len(data) // 2:len(data) // 2 + 64] ^= 0xFF
        open(f"{bank}/{lists}", "wb").write(data.tobytes())
        client.reload(manifest.version)
        assert client.ready()["status"] == "ready"
        with pytest.raises(RefbankError) as caught:
            client.search(vector=vector_of[first], k=1, nprobe=manifest.index.nlist)  # every list probed
        assert (caught.value.status, caught.value.error) == (503, "storage_corrupt")
        assert caught.value.body["object"] == lists and "checksum" in caught.value.detail
        assert error(raw(server.url, "/readyz", token=None))[1]["objects"].keys() == {lists}
        # CURRENT holding random bytes: said so by a reload to CURRENT and by /v1/bank; the version served stays.
        open(f"{bank}/CURRENT", "wb").write(np.random.default_rng(1).integers(0, 256, 24, np.uint8).tobytes())
        for path, method in (("/admin/reload", "POST"), ("/v1/bank", "GET")):
            status, answer = error(raw(server.url, path, method=method))
            assert (status, answer["error"], answer["object"]) == (503, "storage_corrupt", "CURRENT"), path
            assert "does not name a version" in answer["detail"]
        assert corrupt_counts(client)["CURRENT"] >= 2
        status, answer = error(raw(server.url, "/readyz", token=None))
        assert (status, answer["version"]) == (503, manifest.version)
        assert answer["objects"].keys() == {lists, "CURRENT"}
    with pytest.raises(BankFormatError, match="CURRENT does not name a version"):
        ServiceState(ServiceConfig(bank=bank)).load()  # `refbank serve` stops with this message


def test_a_bank_whose_current_has_no_index_is_served_at_its_newest_indexed_version(world, tmp_path, caplog):
    """Between `refbank build` and `refbank index`: CURRENT names a version without an index. Load and reload serve
    the newest version with one and say so (log line, /readyz, /v1/bank, reload answer); once CURRENT has an index
    again, a reload moves to it."""
    bank = copy_bank(world, tmp_path / "bank")
    ref = BankRef(bank)
    indexed = read_manifest(ref)
    built = publish(ref, indexed.with_(index=None), read_current(ref))  # what a build publishes
    caplog.set_level(logging.INFO, logger="refbank.service")
    with serving(ServiceConfig(bank=bank, token=TOKEN)) as (server, client):
        ready, info = client.ready(), client.bank()
        assert ready["version"] == info["version"] == indexed.version and info["current"] == built
        for note in (ready["note"], info["note"]):
            assert f"CURRENT is {built}, which has no index" in note and f"serving {indexed.version}" in note
        assert any(f"serving {indexed.version}" in r.getMessage() and "has no index" in r.getMessage()
                   for r in caplog.records)
        answer = client.reload()  # to CURRENT: still no index there, so the version served stays
        assert (answer["previous"], answer["version"]) == (indexed.version, indexed.version) and answer["note"]
        with pytest.raises(RefbankError) as caught:
            client.reload(built)  # asked for by name: refused, as before
        assert caught.value.status == 409 and "no index" in caught.value.detail
        reindexed = publish(ref, indexed, read_current(ref))  # what `refbank index` publishes next
        answer = client.reload()
        assert answer["version"] == reindexed and answer["note"] is None
        assert client.ready()["note"] is None and client.bank()["current"] == reindexed
        assert len(client.search(text="cat", k=3)["results"]) == 3


def test_a_store_that_keeps_failing_answers_503_storage_unavailable_then_recovers(world, faulty_s3):
    proxy, options, bucket = faulty_s3
    fs = s3fs.S3FileSystem(**{**options, "endpoint_url": proxy.url})
    for root, _, files in os.walk(world["bank"]):  # the session bank, copied to S3 through the (idle) proxy
        for file in files:
            local = os.path.join(root, file)
            fs.pipe_file(f"{bucket}/bank/{os.path.relpath(local, world['bank'])}", open(local, "rb").read())
    table = read_bank(world["bank"])
    vector = np.asarray(table["visual_embedding"][0].as_py(), np.float32)
    query = (vector / np.linalg.norm(vector)).tolist()
    with serving(ServiceConfig(bank=f"s3://{bucket}/bank", storage_options=options, token=TOKEN)) as (_, client):
        # Every read of a list object is denied: the first search has to fetch lists, so it cannot be answered.
        rule = proxy.rule("GET", f"/{bucket}/bank/index/.*/lists/", "denied", times=1000)
        with pytest.raises(RefbankError) as failed:
            client.search(vector=query, k=1)
        assert (failed.value.status, failed.value.error) == (503, "storage_unavailable")
        assert "AccessDenied" in str(failed.value.detail) and "/lists/" in failed.value.body["object"]
        assert rule.hits >= 1
        proxy.reset()  # the store is back: the same request is answered, without restarting the service
        assert client.search(vector=query, k=1)["k"] == 1
