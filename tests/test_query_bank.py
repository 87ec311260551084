"""The query service's data layer: open_bank, the list cache, BankSearcher — real faiss, real files, moto S3."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from bank_builder.encoders.base import EncoderSpec
from bank_builder.format import BankMismatchError, BankRef, IndexCorruptError, index_layout, parts, publish
from bank_builder.format import read_current, read_manifest, storage, versions
from bank_builder.format.trained import read_trained
from bank_builder.index import IndexConfig, build_index
from bank_builder.index.autotune import recall_at_k
from index_helpers import Monolithic, clustered, exact_knn, make_bank
from query import lists as lists_module
from query.bank import METADATA_COLUMNS, open_bank
from query.disk_cache import DiskCache
from query.lists import BudgetTooSmall, CacheConfig
from query.prefetch import Prefetcher
from query.search import MAX_K, BankSearcher

K = 10
SPEC = EncoderSpec(name="synthetic-32", family="open_clip", architecture="synthetic", weights="untrained",
                   untrained=True, seed=0, image_size=64, patch_size=8, visual_dim=32, text_dim=16,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
# IVF-PQ (8-byte codes) with refine vectors: 80 bytes per vector, a few list objects of ≤ 24 KiB for 3000 vectors.
CONFIG = IndexConfig(flat_below=0, memory_target_bytes_per_vector=16, autotune_queries=100,
                     nprobe_candidates=(1, 4, 16), refine_factor=2, object_bytes=24 << 10)
ROWS_PER_GROUP = 256  # parts of 900 / 1400 / 700 rows span 4 / 6 / 3 row groups


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """A local 3-part bank: v1 parts, v2 with a full encoder spec, v3 = v2 + its IVF-PQ index."""
    url = str(tmp_path_factory.mktemp("query") / "bank")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parts, "ROW_GROUP_SIZE", ROWS_PER_GROUP)
        bank = make_bank(url, part_rows=(900, 1400, 700), dim=32, n_clusters=24, seed=4)
    ref = BankRef(url)
    publish(ref, read_manifest(ref).with_(encoder=SPEC.to_dict()), read_current(ref))
    build_index(url, CONFIG)
    return bank


@pytest.fixture(scope="module")
def mono(built):
    """The same vectors in one monolithic faiss index (IVF-PQ + refine on float16 copies)."""
    ref = BankRef(built.url)
    return Monolithic(read_trained(ref, read_manifest(ref).index), built)


def _queries(bank, n, seed=1):
    return clustered(np.random.default_rng(seed), bank.centers, n)


def _searcher(url, storage_options=None, disk=None, **cache_options):
    bank = open_bank(url, storage_options=storage_options, expected_encoder=SPEC)
    return BankSearcher(bank, CacheConfig(**cache_options), disk=disk)


def _whole_bytes(built):
    return _searcher(built.url).cache.whole_bytes


def _assert_same(got, want):
    """Same ids; the same exact scores up to float32 summation order (faiss and numpy add up differently)."""
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)


def _spy_fetches(monkeypatch, delay=0.0):
    """Record the lists of every fetch from the bank (ranged reads of list objects)."""
    fetched, fetch = [], lists_module.fetch_lists

    def spy(ref, entry, directory, lists, *more):
        fetched.append(sorted(lists))
        time.sleep(delay)
        return fetch(ref, entry, directory, lists, *more)

    monkeypatch.setattr(lists_module, "fetch_lists", spy)
    return fetched


@pytest.mark.parametrize("share", [1.0, 0.4, 0.1, None], ids=["whole", "40%", "10%", "few-lists"])
def test_results_equal_one_monolithic_index_whatever_the_budget(built, mono, share):
    whole = _whole_bytes(built)
    searcher = _searcher(built.url)
    nprobe = 6
    budget = int(share * whole) if share else int(np.sort(searcher.cache.charge)[-nprobe:].sum()) + 1
    searcher = _searcher(built.url, memory_bytes=budget)
    q = _queries(built, 64, seed=2)
    want = mono.search(q, K, nprobe, 2)
    _assert_same(searcher.search(q, K, nprobe), want)  # batched (split when its lists exceed the budget)
    for i in range(len(q)):  # batch 1, one query after another: lists come and go
        _assert_same(searcher.search(q[i:i + 1], K, nprobe), (want[0][i:i + 1], want[1][i:i + 1]))
        stats = searcher.stats()
        assert stats["resident_bytes"] + stats["leaked_bytes"] <= budget
    stats = searcher.stats()
    if share == 1.0:
        assert searcher.cache.never_evicts and stats["evictions"] == 0 and stats["misses"] == stats["resident_lists"]
    else:
        assert not searcher.cache.never_evicts and stats["evictions"] > 0
    np.testing.assert_array_equal(searcher.search(q, K, nprobe, refine_factor=0)[1], mono.search(q, K, nprobe)[1])


def test_a_first_query_fetches_only_its_probed_lists(built, monkeypatch):
    searcher = _searcher(built.url, memory_bytes=10**9)
    fetched = _spy_fetches(monkeypatch)
    q = _queries(built, 1, seed=3)
    _, probed = searcher.ivf.quantizer.search(q, 6)
    searcher.search(q, K, nprobe=6)
    assert fetched == [sorted(probed[0].tolist())]
    stats = searcher.stats()
    wanted = int(searcher.cache.directory["bytes"][probed[0]].sum())
    assert wanted <= stats["bytes_fetched"] <= 1.5 * wanted  # coalesced neighbours may bring a small gap along
    assert stats["fetch_requests"] <= 6 and stats["misses"] == 6
    searcher.search(q, K, nprobe=6)  # warm: nothing fetched again
    assert len(fetched) == 1 and searcher.stats()["hits"] == 6


def test_a_budget_below_one_querys_lists_is_refused_with_the_fix(built):
    searcher = _searcher(built.url, memory_bytes=1000)
    with pytest.raises(BudgetTooSmall, match="raise the memory budget"):
        searcher.search(_queries(built, 1), K, nprobe=6)
    assert searcher.stats()["resident_bytes"] == 0


def test_eviction_keeps_the_budget_on_a_long_mixed_stream_and_2q_resists_scans(built):
    """A hot region queried again and again, between bursts of a one-off scan (every other list once, more of
    them per burst than the budget has room for): 2Q keeps the hot lists (protected once fetched or probed a
    second time; the scan's lists only pass through probation), LRU lets each burst push hot lists out."""
    budget = int(0.3 * _whole_bytes(built))
    hot = clustered(np.random.default_rng(4), built.centers[:2], 8)
    probe = _searcher(built.url)
    hot_lists = np.unique(probe.ivf.quantizer.search(hot, 4)[1])
    centroids = probe.ivf.quantizer.reconstruct_n(0, probe.nlist)  # a centroid's query probes its own list first
    scan = [l for l in range(probe.nlist) if l not in set(hot_lists.tolist())]
    assert probe.cache.charge[hot_lists].sum() < 0.7 * budget < probe.cache.charge.sum()
    hot_misses = {}
    for policy in ("2q", "lru"):
        searcher = _searcher(built.url, memory_bytes=budget, policy=policy)
        hot_misses[policy] = 0
        for start in range(0, len(scan), 15):
            before = searcher.stats()["misses"]
            for q in hot:
                searcher.search(q[None], K, nprobe=4)
            hot_misses[policy] += searcher.stats()["misses"] - before if start >= 30 else 0  # after warm-up
            for l in scan[start:start + 15]:
                searcher.search(centroids[l:l + 1], K, nprobe=1)
            stats = searcher.stats()
            assert stats["resident_bytes"] + stats["leaked_bytes"] <= budget
        assert searcher.stats()["evictions"] > 0
    assert hot_misses["2q"] == 0 < hot_misses["lru"]


def test_eviction_gives_the_pages_of_a_list_back(built):
    """An evicted list's rows read as zeros again (its pages went back to the system), except on an edge page
    a resident neighbour still uses, whose bytes stay."""
    searcher = _searcher(built.url, memory_bytes=_whole_bytes(built) // 2)
    cache = searcher.cache
    rows = np.diff(cache.row_start)
    l = int(np.argmax(rows))  # the longest list: its vectors span several pages
    cache.prefetch(np.array([l, l + 1]))
    start, end = int(cache.row_start[l]), int(cache.row_start[l + 1])
    kept = cache.vectors[end:end + 1].copy()  # list l + 1's first row shares l's last page
    assert cache.vectors[start:end].any() and kept.any()
    with cache._rw.write():
        cache._evict(np.array([l]))
    per_page = lists_module.PAGE // (2 * cache.entry.dim)
    first_full = -(-start // per_page) * per_page
    last_full = (end // per_page) * per_page
    assert last_full > first_full and not cache.vectors[first_full:last_full].any()
    np.testing.assert_array_equal(cache.vectors[end:end + 1], kept)


def test_concurrent_requests_for_cold_lists_fetch_each_once(built, monkeypatch):
    searcher = _searcher(built.url)
    fetched = _spy_fetches(monkeypatch, delay=0.2)  # a slow store: every thread arrives while the fetch runs
    q = _queries(built, 1, seed=6)
    barrier, results = threading.Barrier(8), []

    def request():
        barrier.wait()
        results.append(searcher.search(q, K, nprobe=6))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(np.array_equal(r[1], results[0][1]) for r in results)
    assert sum(len(f) for f in fetched) == len(set(sum(fetched, []))) == 6  # every list fetched once


@pytest.mark.parametrize("share", [0.25, None], ids=["evicting", "whole"])
def test_searches_from_many_threads_match_serial_results(built, mono, share):
    q = _queries(built, 64, seed=5)
    want = mono.search(q, K, 6, 2)
    budget = int(share * _whole_bytes(built)) if share else 10**9
    searcher = _searcher(built.url, memory_bytes=budget)
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
        _assert_same((np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])), want)
    stats = searcher.stats()
    assert stats["resident_bytes"] + stats["leaked_bytes"] <= budget
    if share is None:  # each probed list installed once, however many threads wanted it
        assert stats["evictions"] == 0 and stats["misses"] == stats["resident_lists"]


def test_prefetch_fills_the_free_budget_largest_first_and_never_evicts(built, mono):
    budget = _whole_bytes(built) // 2
    searcher = _searcher(built.url, memory_bytes=budget)
    prefetcher = Prefetcher(searcher.cache).start()
    assert prefetcher.wait(60)
    stats, cache = searcher.stats(), searcher.cache
    assert stats["evictions"] == 0 and prefetcher.installed == stats["resident_lists"] > 0
    assert budget - cache.charge.max() < stats["resident_bytes"] <= budget  # filled, as far as lists fit
    sizes = cache.directory["bytes"]
    assert sizes[cache.resident].mean() > 1.5 * sizes[~cache.resident].mean()  # the largest went first
    q = _queries(built, 16, seed=8)
    _assert_same(searcher.search(q, K, 4), mono.search(q, K, 4, 2))


def test_access_counts_persist_and_order_the_next_prefetch(built, tmp_path):
    heat = tmp_path / "heat.npy"
    first = _searcher(built.url)
    hot = clustered(np.random.default_rng(12), built.centers[3:4], 20)
    for q in hot:
        first.search(q[None], K, nprobe=2)
    Prefetcher(first.cache, heat).save_heat()
    probed = np.unique(first.ivf.quantizer.search(hot, 2)[1])
    second = _searcher(built.url, memory_bytes=_whole_bytes(built) // 4)
    prefetcher = Prefetcher(second.cache, heat)
    assert set(prefetcher.order()[:len(probed)].tolist()) == set(probed.tolist())  # the hot lists lead
    assert prefetcher.start().wait(60) and second.cache.resident[probed].all()


def test_prefetch_holds_back_while_a_request_waits_on_a_fetch(built, monkeypatch):
    searcher = _searcher(built.url)
    calls, fetch = [], lists_module.fetch_lists

    def slow(ref, entry, directory, lists, *more):
        start = time.monotonic()
        time.sleep(0.3 if threading.current_thread().name == "request" else 0.0)
        calls.append((threading.current_thread().name, start, time.monotonic()))
        return fetch(ref, entry, directory, lists, *more)

    monkeypatch.setattr(lists_module, "fetch_lists", slow)
    request = threading.Thread(target=searcher.search, args=(_queries(built, 1), K), name="request")
    request.start()
    while not searcher.cache.foreground:  # the request is fetching now
        time.sleep(0.005)
    prefetcher = Prefetcher(searcher.cache).start()
    request.join()
    assert prefetcher.wait(60)
    (_, _, request_done), = [c for c in calls if c[0] == "request"]
    prefetched = [c for c in calls if c[0] == "refbank-prefetch"]
    assert prefetched and all(start >= request_done for _, start, _ in prefetched)


def test_disk_tier_serves_a_second_process_and_replaces_a_damaged_copy(built, tmp_path):
    q = _queries(built, 30, seed=3)
    first = _searcher(built.url, disk=DiskCache(tmp_path, 10**9))
    entry = first.bank.index
    want = first.search(q, K, entry.nlist)
    listed = first.stats()["bytes_fetched"]
    assert listed == sum(o.bytes for o in entry.lists)  # every list, once: neighbours coalesced into few reads
    files = sorted(tmp_path.glob("*.list"))
    assert len(files) == int((first.cache.directory["count"] > 0).sum())
    second = _searcher(built.url, disk=DiskCache(tmp_path, 10**9))  # a restart: lists come from disk
    _assert_same(second.search(q, K, entry.nlist), want)
    assert second.stats()["bytes_fetched"] == 0 and second.stats()["disk_hits"] == len(files)
    data = files[0].read_bytes()
    files[0].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    third = _searcher(built.url, disk=DiskCache(tmp_path, 10**9))
    _assert_same(third.search(q, K, entry.nlist), want)
    stats = third.stats()
    assert stats["disk_corrupt"] == 1 and stats["bytes_fetched"] == len(data) and files[0].read_bytes() == data
    small = DiskCache(tmp_path, 3 * len(data))  # a limit below what is there: oldest files go first
    assert small.stats()["disk_bytes"] <= 3 * len(data) and small.stats()["disk_evictions"] > 0
    assert sum(f.stat().st_size for f in tmp_path.glob("*.list")) <= 3 * len(data)


def test_a_changed_list_is_refused_and_nothing_is_kept(built, tmp_path):
    searcher = _searcher(built.url, disk=DiskCache(tmp_path, 10**9))
    entry = searcher.bank.index
    directory = searcher.cache.directory
    target = int(np.flatnonzero(directory["count"] > 0)[0])
    path = index_layout.index_url(BankRef(built.url), entry.id, entry.lists[int(directory["object"][target])].object)
    original = open(path, "rb").read()
    at = int(directory["offset"][target])
    open(path, "wb").write(original[:at] + bytes([original[at] ^ 1]) + original[at + 1:])
    try:
        q = _queries(built, 10)
        for _ in range(2):  # a failed fetch leaves no state behind: the second try checks again
            with pytest.raises(IndexCorruptError, match=f"list {target} .* does not match its checksum"):
                searcher.search(q, K, entry.nlist)
        assert not searcher.cache.resident.any() and not list(tmp_path.glob("*.list"))
    finally:
        open(path, "wb").write(original)
    assert searcher.search(q, K, entry.nlist)[1].shape == (10, K)


def test_serving_a_bank_never_imports_ray(built):
    code = ("import sys, numpy as np; import query.service; from query.bank import open_bank; "
            "from query.search import BankSearcher; "
            f"s = BankSearcher(open_bank({built.url!r})); s.search(np.eye(32, dtype=np.float32)[:2], 5); "
            "print(sorted(m for m in ('ray', 'bank_builder.index', 'bank_builder.pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_open_bank_checks_encoder_format_and_version(built, tmp_path):
    bank = open_bank(built.url, expected_encoder=SPEC.to_dict())
    assert (bank.version, bank.versions) == ("v000003", ["v000001", "v000002", "v000003"])
    assert bank.spec == SPEC and bank.dims == {"visual": 32, "text": 16}
    other = replace(SPEC, weights="openai", untrained=False, seed=None, image_size=224)
    with pytest.raises(BankMismatchError) as err:
        open_bank(built.url, expected_encoder=other)
    message = str(err.value)
    for field in ("weights", "untrained", "seed", "image_size"):
        assert f"{field}: bank has" in message
    assert "patch_size" not in message and "'openai'" in message
    with pytest.raises(BankMismatchError, match="visual_dim: bank has 32, encoder has 64"):
        open_bank(built.url, expected_encoder=replace(SPEC, visual_dim=64))
    with pytest.raises(BankMismatchError, match="no version 'v000007'; available: v000001, v000002, v000003"):
        open_bank(built.url, version="v000007")
    old = open_bank(built.url, version="v000001")  # before the index, with the builder's partial spec
    assert old.index is None
    with pytest.raises(BankMismatchError, match="incomplete encoder spec"):
        old.spec
    with pytest.raises(BankMismatchError, match="architecture: bank has None"):
        open_bank(built.url, version="v000001", expected_encoder=SPEC)
    with pytest.raises(BankMismatchError, match="has no index"):
        BankSearcher(old)
    tiny = make_bank(str(tmp_path / "tiny"), part_rows=(40,))
    ref = BankRef(tiny.url)
    # A manifest that CURRENT never named (a writer died before its swap) is not a version.
    storage.write_json(versions.manifest_url(ref, "v000002"), read_manifest(ref, "v000001").to_dict())
    with pytest.raises(BankMismatchError, match="no version 'v000002'; available: v000001"):
        open_bank(tiny.url, version="v000002")
    with pytest.raises(BankMismatchError, match="no bank at .*nothing is stored there"):
        open_bank(str(tmp_path / "nothing"))


def test_metadata_and_embeddings_read_only_the_row_groups_holding_the_rows(built, monkeypatch):
    reads, read_row_group = [], pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        reads.append((i, list(columns)))
        return read_row_group(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    bank = open_bank(built.url)
    ids = [parts.segment_id(1, r) for r in (600, 5)] + [parts.segment_id(0, 899), parts.segment_id(1, 1399),
                                                          parts.segment_id(1, 600)]
    meta = bank.metadata(ids)
    tables = {o: parts.read_part(BankRef(built.url), f"part-{o:03d}").drop_columns(["visual_embedding",
                                                                                    "text_embedding"])
              for o in (0, 1)}
    assert meta == [tables[o].slice(r, 1).to_pylist()[0] for o, r in map(parts.split_segment_id, ids)]
    assert meta[0]["segment_id"] == ids[0] and meta[0]["part"] == "part-001" and set(meta[0]) == set(METADATA_COLUMNS)
    assert reads == [(g, METADATA_COLUMNS) for g in (3, 0, 2, 5)]  # 899 // 256; 5, 600, 1399 // 256
    assert bank.stats()["footers_read"] == 2 and bank.stats()["row_groups_read"] == 4
    reads.clear()
    vectors = bank.visual_embeddings(ids)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 32)
    np.testing.assert_array_equal(vectors, built.vectors[np.searchsorted(built.ids, ids)].astype(np.float32))
    assert reads == [(g, ["segment_id", "visual_embedding"]) for g in (3, 0, 2, 5)]
    assert bank.stats()["footers_read"] == 2 and bank.stats()["row_groups_read"] == 8  # footers are kept
    for unknown in (parts.segment_id(7, 0), parts.segment_id(0, 900), -1):
        with pytest.raises(KeyError, match=f"segment id {unknown} "):
            bank.metadata([parts.segment_id(0, 1), unknown])
    assert bank.metadata([]) == [] and bank.visual_embeddings([]).shape == (0, 32)
    assert bank.labels(np.array(ids + [-1])) == [m["label"] for m in meta] + [None]  # -1: a missing search hit
    part0 = [parts.segment_id(0, r) for r in range(900)]
    assert bank.labels(part0) == tables[0]["label"].to_pylist() and None in bank.labels(part0)
    assert bank.stats()["label_parts_loaded"] == 2 and bank.labels([]) == []
    with pytest.raises(KeyError, match="segment id -2 "):
        bank.labels([-2])
    assert bank.label_table().labels == built.label_names


def test_search_input_is_checked(built):
    searcher = _searcher(built.url)
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


def test_open_search_and_read_metadata_on_s3_with_few_requests(built, mono, s3, monkeypatch):
    options, bucket = s3
    fs = s3fs.S3FileSystem(**options)
    for root, _, files in os.walk(built.url):  # object names are relative: a bank moves between stores as is
        for name in files:
            local = os.path.join(root, name)
            fs.pipe_file(f"{bucket}/bank/{os.path.relpath(local, built.url)}", open(local, "rb").read())
    url = f"s3://{bucket}/bank"
    gets = []  # every GET the S3 client sends: (key, bytes returned)
    cat_file = s3fs.S3FileSystem._cat_file

    async def counting(self, path, version_id=None, start=None, end=None):
        data = await cat_file(self, path, version_id=version_id, start=start, end=end)
        gets.append((path.rsplit("/", 3)[-2:], len(data)))
        return data

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counting)
    searcher = _searcher(url, storage_options=options, memory_bytes=100_000)
    opened = len(gets)
    q = _queries(built, 1, seed=9)
    _, probed = searcher.ivf.quantizer.search(q, searcher.nprobe)
    _assert_same(searcher.search(q, K), mono.search(q, K, searcher.nprobe, 2))
    first = gets[opened:]
    wanted = int(searcher.cache.directory["bytes"][probed[0]].sum())
    assert all(key[0] == "lists" for key, _ in first) and len(first) <= searcher.nprobe
    assert wanted <= sum(n for _, n in first) <= 1.5 * wanted
    qs = _queries(built, 20, seed=9)
    _assert_same(searcher.search(qs, K), mono.search(qs, K, searcher.nprobe, 2))
    assert searcher.stats()["resident_bytes"] + searcher.stats()["leaked_bytes"] <= 100_000
    ids = np.unique(searcher.search(qs[:2], 3)[1])
    local = open_bank(built.url)
    bank = searcher.bank
    assert bank.metadata(ids) == local.metadata(ids) and bank.labels(ids) == local.labels(ids)
    np.testing.assert_array_equal(bank.visual_embeddings(ids), local.visual_embeddings(ids))
    groups = {(o, r // ROWS_PER_GROUP) for o, r in map(parts.split_segment_id, ids.tolist())}
    assert bank.stats()["row_groups_read"] == 2 * len(groups) < 13  # of the bank's 4 + 6 + 3, per call
