"""The query service's data layer: open_bank, SliceCache, BankSearcher — real faiss, real files, moto S3."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from bank_builder import manifest, storage, store
from bank_builder.encoders.base import EncoderSpec
from bank_builder.index import IndexConfig, IndexCorruptError, build_index, layout, open_index
from bank_builder.index.autotune import recall_at_k
from bank_builder.index.train import deserialize
from index_helpers import assert_same_topk, clustered, exact_knn, make_bank, monolithic_search
from query.bank import METADATA_COLUMNS, open_bank
from query.search import MAX_K, BankSearcher
from query.slices import SliceCache

K = 10
SPEC = EncoderSpec(name="synthetic-32", family="open_clip", architecture="synthetic", weights="untrained",
                   untrained=True, seed=0, image_size=64, patch_size=8, visual_dim=32, text_dim=16,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
# IVF-PQ (8-byte codes) with refine vectors: 80 bytes per vector, ~10 slices of ≤ 24 KiB for 3000 vectors.
CONFIG = IndexConfig(flat_below=0, memory_target_bytes_per_vector=16, autotune_queries=100,
                     nprobe_candidates=(1, 4, 16), refine_factor=2, slice_bytes=24 << 10)
ROWS_PER_GROUP = 256  # parts of 900 / 1400 / 700 rows span 4 / 6 / 3 row groups


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """A local 3-part bank: v1 parts, v2 with a full encoder spec, v3 = v2 + its IVF-PQ index."""
    url = str(tmp_path_factory.mktemp("query") / "bank")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "ROW_GROUP_SIZE", ROWS_PER_GROUP)
        bank = make_bank(url, part_rows=(900, 1400, 700), dim=32, n_clusters=24, seed=4)
    manifest.publish(url, {**manifest.read_manifest(url), "encoder": SPEC.to_dict()})
    build_index(url, CONFIG)
    return bank


def _queries(bank, n, seed=1):
    return clustered(np.random.default_rng(seed), bank.centers, n)


def _searcher(url, storage_options=None, **cache_options):
    bank = open_bank(url, storage_options=storage_options, expected_encoder=SPEC)
    cache = SliceCache(bank, **cache_options)
    return BankSearcher(bank, cache), cache


def _spy_fetches(monkeypatch, delay=0.0):
    """Record the object name of every read of an index object from the bank."""
    fetched, read = [], layout.read_object

    def spy(bank, index_id, entry, storage_options, verify=True):
        fetched.append(entry["object"])
        time.sleep(delay)
        return read(bank, index_id, entry, storage_options, verify)

    monkeypatch.setattr(layout, "read_object", spy)
    return fetched


def _flip_last_byte(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-1] + bytes([data[-1] ^ 1]))
    return data


def _assert_same_refined(got, want):
    """Same ids; the same exact scores up to float32 summation order (faiss and numpy add up differently)."""
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)


def test_lazy_search_equals_full_sliced_index_and_monolithic_faiss(built):
    searcher, cache = _searcher(built.url)
    entry = searcher.bank.index
    assert len(entry["slices"]) >= 6 and searcher.refine_factor == 2
    full = open_index(built.url)  # every slice loaded and kept: the index package's own search
    trained = storage.join(layout.index_dir(built.url, entry["id"]), entry["trained"]["object"])
    q = _queries(built, 60)
    assert searcher.mode == "whole"  # the default budget holds this index
    for nprobe in (1, 5, entry["nlist"]):
        _assert_same_refined(searcher.search(q, K, nprobe), full.search(q, K, nprobe))
        d_mono, i_mono = monolithic_search(deserialize(storage.read_bytes(trained)), built, q, K, nprobe)
        assert_same_topk(*searcher.search(q, K, nprobe, refine_factor=0), d_mono, i_mono)
    # Every list probed, 500 candidates re-ranked on the stored vectors: brute force's answer, exact scores.
    scores, ids = searcher.search(q, K, entry["nlist"], refine_factor=50)
    exact = np.einsum("qd,qkd->qk", q, built.vectors[np.searchsorted(built.ids, ids)].astype(np.float32))
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-6)
    assert recall_at_k(ids, exact_knn(built, q, K)[1]) >= 0.99
    stats = cache.stats()
    assert stats["fetches"] == len(entry["slices"]) + 1  # each slice once, plus the trained quantizer
    assert stats["misses"] == len(entry["slices"]) and stats["hits"] > 0  # searches that fetched nothing
    assert stats["bytes_fetched"] == entry["trained"]["bytes"] + sum(s["bytes"] for s in entry["slices"])


def test_memory_budget_holds_and_a_query_fetches_only_the_slices_owning_its_lists(built, monkeypatch):
    unlimited, unlimited_cache = _searcher(built.url)
    unlimited.search(_queries(built, 5), K, unlimited.index.nlist)
    total = unlimited_cache.stats()["resident_bytes"]
    budget = total // 3
    reference = open_index(built.url)
    q = _queries(built, 40, seed=2)
    expected = reference.search(q, K, 6)
    searcher, cache = _searcher(built.url, memory_bytes=budget)
    objects = {s["object"]: n for n, s in enumerate(searcher.bank.index["slices"])}
    fetched = _spy_fetches(monkeypatch)
    for i in range(len(q)):
        before, start = set(cache.resident()), len(fetched)
        scores, ids = searcher.search(q[i:i + 1], K, nprobe=6)
        np.testing.assert_array_equal(scores, expected[0][i:i + 1])
        np.testing.assert_array_equal(ids, expected[1][i:i + 1])
        got = {objects[o] for o in fetched[start:]}
        owners = set(reference.slices_for(reference.probe(q[i:i + 1], 6)[2]).ravel().tolist())
        assert owners - before <= got <= owners
        assert cache.stats()["resident_bytes"] <= budget
    stats = cache.stats()
    assert stats["evictions"] > 0 and 0 < stats["resident_slices"] < len(objects)
    assert stats["misses"] == len(fetched) == stats["fetches"] - 1 and stats["hits"] > 0  # - 1: the quantizer
    tiny, tiny_cache = _searcher(built.url, memory_bytes=1000)  # below any slice: served, never kept
    np.testing.assert_array_equal(tiny.search(q, K, nprobe=6)[1], expected[1])
    assert tiny_cache.stats()["resident_bytes"] == 0 and tiny_cache.stats()["oversize"] > 0


def test_disk_cache_serves_a_second_cache_and_replaces_a_damaged_copy(built, tmp_path):
    q = _queries(built, 30, seed=3)
    first, first_cache = _searcher(built.url, cache_dir=tmp_path)
    entry = first.bank.index
    want = first.search(q, K, entry["nlist"])
    assert first_cache.stats()["bytes_fetched"] == entry["trained"]["bytes"] + sum(s["bytes"] for s in entry["slices"])
    names = {s["sha256"] + ".npz" for s in entry["slices"]} | {entry["trained"]["sha256"] + ".faissindex"}
    assert set(os.listdir(tmp_path)) == names
    second, second_cache = _searcher(built.url, cache_dir=tmp_path)
    for got, exp in zip(second.search(q, K, entry["nlist"]), want):
        np.testing.assert_array_equal(got, exp)
    stats = second_cache.stats()
    assert (stats["bytes_fetched"], stats["fetches"], stats["disk_hits"]) == (0, 0, len(names))
    damaged = tmp_path / (entry["slices"][0]["sha256"] + ".npz")
    _flip_last_byte(damaged)
    third, third_cache = _searcher(built.url, cache_dir=tmp_path)
    for got, exp in zip(third.search(q, K, entry["nlist"]), want):
        np.testing.assert_array_equal(got, exp)
    stats = third_cache.stats()
    assert (stats["disk_corrupt"], stats["fetches"], stats["bytes_fetched"]) == (1, 1, entry["slices"][0]["bytes"])
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == entry["slices"][0]["sha256"]


def test_corrupt_bank_object_is_refused_and_nothing_is_cached(built, tmp_path):
    searcher, cache = _searcher(built.url, cache_dir=tmp_path)
    entry = searcher.bank.index
    path = os.path.join(layout.index_dir(built.url, entry["id"]), entry["slices"][0]["object"])
    original = _flip_last_byte(path)
    try:
        q = _queries(built, 10)
        for _ in range(2):  # a failed load leaves no state behind: the second try checks again
            with pytest.raises(IndexCorruptError, match="checksum"):
                searcher.search(q, K, entry["nlist"])
        assert 0 not in cache.resident()
        assert not (tmp_path / (entry["slices"][0]["sha256"] + ".npz")).exists()
    finally:
        open(path, "wb").write(original)
    assert searcher.search(q, K, entry["nlist"])[1].shape == (10, K)


def test_concurrent_requests_for_a_cold_slice_fetch_it_once(built, monkeypatch):
    bank = open_bank(built.url)
    cache = SliceCache(bank)
    fetched = _spy_fetches(monkeypatch, delay=0.2)  # a slow store: every thread arrives while the fetch runs
    barrier, results = threading.Barrier(8), []

    def request():
        barrier.wait()
        results.append(cache(3))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetched == [bank.index["slices"][3]["object"]]
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert (cache.stats()["misses"], cache.stats()["hits"]) == (1, 7)
    with pytest.raises(ValueError, match="its own SliceCache"):
        BankSearcher(bank, cache).search(_queries(built, 1), K)


@pytest.mark.parametrize("memory_bytes", [60_000, None], ids=["paged", "whole"])
def test_searches_from_many_threads_match_serial_results(built, memory_bytes):
    q = _queries(built, 64, seed=5)
    reference = open_index(built.url).search(q, K, 6)
    # paged: a few slices, threads evict each other's; whole: threads install slices while others search.
    searcher, cache = _searcher(built.url, **({} if memory_bytes is None else {"memory_bytes": memory_bytes}))
    assert searcher.mode == ("whole" if memory_bytes is None else "paged")
    out = [None] * 8
    barrier = threading.Barrier(8)

    def work(t):
        barrier.wait()
        out[t] = [searcher.search(q[i:i + 4], K, 6) for i in range(0, len(q), 4)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for blocks in out:
        _assert_same_refined((np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])),
                             reference)
    stats = cache.stats()
    if memory_bytes is None:  # each touched slice installed once, however many threads wanted it
        assert stats["evictions"] == 0 and stats["misses"] == stats["fetches"] - 1 == stats["resident_slices"]
    else:
        assert stats["resident_bytes"] <= memory_bytes and stats["evictions"] > 0


def test_open_bank_checks_encoder_format_and_version(built, tmp_path):
    bank = open_bank(built.url, expected_encoder=SPEC.to_dict())
    assert (bank.version, bank.versions) == ("v000003", ["v000001", "v000002", "v000003"])
    assert bank.spec == SPEC and bank.dims == {"visual": 32, "text": 16}
    other = replace(SPEC, weights="openai", untrained=False, seed=None, image_size=224)
    with pytest.raises(manifest.BankMismatchError) as err:
        open_bank(built.url, expected_encoder=other)
    message = str(err.value)
    for field in ("weights", "untrained", "seed", "image_size"):
        assert f"{field}: bank has" in message
    assert "patch_size" not in message and "'openai'" in message
    with pytest.raises(manifest.BankMismatchError, match="visual_dim: bank has 32, encoder has 64"):
        open_bank(built.url, expected_encoder=replace(SPEC, visual_dim=64))
    with pytest.raises(manifest.BankMismatchError, match="no version 'v000007'; available: v000001, v000002, v000003"):
        open_bank(built.url, version="v000007")
    old = open_bank(built.url, version="v000001")  # before the index, with the builder's partial spec
    assert old.index is None
    with pytest.raises(manifest.BankMismatchError, match="incomplete encoder spec"):
        old.spec
    with pytest.raises(manifest.BankMismatchError, match="architecture: bank has None"):
        open_bank(built.url, version="v000001", expected_encoder=SPEC)
    with pytest.raises(ValueError, match="has no index"):
        SliceCache(old)
    tiny = make_bank(str(tmp_path / "tiny"), part_rows=(40,))
    storage.write_json(manifest.manifest_url(tiny.url, "v000002"),
                       {**manifest.read_manifest(tiny.url), "format_version": 99})
    with pytest.raises(manifest.BankMismatchError, match="format 99"):
        open_bank(tiny.url, version="v000002")
    with pytest.raises(manifest.BankMismatchError, match="no published version"):
        open_bank(str(tmp_path / "nothing"))


def test_metadata_and_embeddings_read_only_the_row_groups_holding_the_rows(built, monkeypatch):
    reads, read_row_groups = [], pq.ParquetFile.read_row_groups

    def spy(self, row_groups, columns=None, **kwargs):
        reads.append((sorted(row_groups), list(columns)))
        return read_row_groups(self, row_groups, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    bank = open_bank(built.url)
    ids = [store.segment_id(1, r) for r in (600, 5)] + [store.segment_id(0, 899), store.segment_id(1, 1399),
                                                          store.segment_id(1, 600)]
    meta = bank.metadata(ids)
    # everything but the embeddings, and mask_kind (parts written before it have no such column)
    parts = {o: store.read_part(built.url, f"part-{o:03d}").drop_columns(["visual_embedding", "text_embedding",
                                                                           "mask_kind"]) for o in (0, 1)}
    assert meta == [parts[o].slice(r, 1).to_pylist()[0] for o, r in map(store.split_segment_id, ids)]
    assert meta[0]["segment_id"] == ids[0] and meta[0]["part"] == "part-001" and set(meta[0]) == set(METADATA_COLUMNS)
    assert reads == [([3], METADATA_COLUMNS), ([0, 2, 5], METADATA_COLUMNS)]  # 899 // 256; 5, 600, 1399 // 256
    assert bank.stats() == {"footers_read": 2, "row_groups_read": 4, "label_parts_loaded": 0}
    reads.clear()
    vectors = bank.visual_embeddings(ids)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 32)
    np.testing.assert_array_equal(vectors, built.vectors[np.searchsorted(built.ids, ids)].astype(np.float32))
    assert reads == [([3], ["segment_id", "visual_embedding"]), ([0, 2, 5], ["segment_id", "visual_embedding"])]
    assert bank.stats()["footers_read"] == 2 and bank.stats()["row_groups_read"] == 8  # footers are kept
    for unknown in (store.segment_id(7, 0), store.segment_id(0, 900), -1):
        with pytest.raises(KeyError, match=f"segment id {unknown} "):
            bank.metadata([store.segment_id(0, 1), unknown])
    assert bank.metadata([]) == [] and bank.visual_embeddings([]).shape == (0, 32)
    assert bank.labels(np.array(ids + [-1])) == [m["label"] for m in meta] + [None]  # -1: a missing search hit
    part0 = [store.segment_id(0, r) for r in range(900)]
    assert bank.labels(part0) == parts[0]["label"].to_pylist() and None in bank.labels(part0)
    assert bank.stats()["label_parts_loaded"] == 2 and bank.labels([]) == []
    with pytest.raises(KeyError, match="segment id -2 "):
        bank.labels([-2])
    assert bank.text_index().labels == built.label_names


def test_search_input_is_checked(built):
    searcher, _ = _searcher(built.url)
    q = _queries(built, 3)
    bad = [(q[:, :16], "shape"), (q[0], "shape"), (np.where(np.arange(32) == 3, np.nan, q), "NaN"),
           (q * 2, "L2-normalised"), (q.astype(np.int64), "float32")]
    for x, match in bad:
        with pytest.raises(ValueError, match=match):
            searcher.search(x, K)
    for k in (0, MAX_K + 1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            searcher.search(q, k)
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        searcher.search(q, K, nprobe=0)
    scores, ids = searcher.search(q[:0], K)
    assert scores.shape == ids.shape == (0, K)
    for refine_factor in (None, 0):  # one list holds < MAX_K vectors: the rest is "none found"
        scores, ids = searcher.search(q.astype(np.float64), MAX_K, nprobe=1, refine_factor=refine_factor)
        assert scores.dtype == np.float32 and ids.dtype == np.int64 and (ids[:, -1] == -1).all()
        assert (scores[ids == -1] == -np.inf).all() and np.isfinite(scores[ids >= 0]).all()


def test_open_search_and_read_metadata_on_s3(built, s3, tmp_path):
    options, bucket = s3
    fs = storage.url_to_fs(f"s3://{bucket}", options)[0]
    for root, _, files in os.walk(built.url):  # object names are relative: a bank moves between stores as is
        for name in files:
            local = os.path.join(root, name)
            fs.pipe_file(f"{bucket}/bank/{os.path.relpath(local, built.url)}", open(local, "rb").read())
    url = f"s3://{bucket}/bank"
    q = _queries(built, 20, seed=9)
    searcher, cache = _searcher(url, storage_options=options, cache_dir=tmp_path, memory_bytes=100_000)
    local, _ = _searcher(built.url)
    assert (searcher.mode, local.mode) == ("paged", "whole")
    _assert_same_refined(searcher.search(q, K), local.search(q, K))
    assert cache.stats()["fetches"] > 1 and cache.stats()["resident_bytes"] <= 100_000
    again, again_cache = _searcher(url, storage_options=options, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.search(q, K)[1], local.search(q, K)[1])
    assert again_cache.stats()["bytes_fetched"] == 0
    ids = np.unique(searcher.search(q[:2], 3)[1])
    bank = searcher.bank
    assert bank.metadata(ids) == local.bank.metadata(ids) and bank.labels(ids) == local.bank.labels(ids)
    np.testing.assert_array_equal(bank.visual_embeddings(ids), local.bank.visual_embeddings(ids))
    groups = {(o, r // ROWS_PER_GROUP) for o, r in map(store.split_segment_id, ids.tolist())}
    assert bank.stats()["row_groups_read"] == 2 * len(groups) < 13  # of the bank's 4 + 6 + 3, per call
