"""A bank's life after its first build: incremental index deltas, removals, compaction, garbage collection, pins,
info and one writer at a time — real Ray, real faiss, results checked against one monolithic faiss index."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest

from bank_builder.format import BankMismatchError, BankRef, ConcurrentUpdateError, list_versions, pin, read_manifest
from bank_builder.format import storage, versions
from bank_builder.format.trained import read_trained
from bank_builder.index import IndexConfig, build_index
from bank_builder.index.compact import compact_index
from bank_builder.lifecycle import Removal, bank_info, collect_garbage, remove_segments
from bank_builder.lifecycle import remove as remove_module
from bank_builder.lifecycle.gc import referenced_objects
from index_helpers import Monolithic, SyntheticBank, clustered, extend_bank, make_bank
from query.bank import open_bank
from query.lists import CacheConfig
from query.search import BankSearcher

K = 10
CONFIG = IndexConfig(memory_target_bytes_per_vector=24, flat_below=0, autotune_queries=100,
                     nprobe_candidates=(1, 4, 16, 32), refine_factor=4, object_bytes=64 << 10)

pytestmark = pytest.mark.usefixtures("ray_local")


def _survivors(bank: SyntheticBank, removed: np.ndarray) -> SyntheticBank:
    keep = ~np.isin(bank.ids, removed)
    return replace(bank, vectors=bank.vectors[keep], ids=bank.ids[keep])


def _assert_equals_monolithic(bank: SyntheticBank, reference: SyntheticBank, budget_share: float = 1.0) -> None:
    """refbank's search of `bank` (CURRENT) equals one monolithic index of `reference`'s vectors with the same
    quantizer: ids exactly, plain scores bit for bit, refined scores to float32 summation order. budget_share:
    the list cache's budget as a share of the index (below 1: lists are evicted and fetched again)."""
    ref = BankRef(bank.url)
    mono = Monolithic(read_trained(ref, read_manifest(ref).index), reference)
    searcher = BankSearcher(open_bank(bank.url))
    if budget_share < 1:
        budget = int(budget_share * searcher.cache.whole_bytes)
        searcher = BankSearcher(open_bank(bank.url), CacheConfig(memory_bytes=budget))
    q = clustered(np.random.default_rng(17), bank.centers, 60)
    for nprobe in (3, 12):
        plain, want = searcher.search(q, K, nprobe, refine_factor=0), mono.search(q, K, nprobe)
        np.testing.assert_array_equal(plain[1], want[1])
        np.testing.assert_array_equal(plain[0], want[0])
        refined, want = searcher.search(q, K, nprobe, refine_factor=4), mono.search(q, K, nprobe, 4)
        np.testing.assert_array_equal(refined[1], want[1])
        np.testing.assert_allclose(refined[0], want[0], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """A 3-part bank (v1) with its IVF-PQ index (v2), built once for the module."""
    bank = make_bank(str(tmp_path_factory.mktemp("lifecycle") / "bank"), part_rows=(1500, 2500, 1000), seed=5)
    assert build_index(bank.url, CONFIG).mode == "full"
    return bank


@pytest.fixture
def indexed(built, tmp_path):
    """A copy of the built bank of the test's own (a bank moves between folders as is: names are relative)."""
    shutil.copytree(built.url, tmp_path / "bank")
    return replace(built, url=str(tmp_path / "bank"))


def test_new_parts_are_indexed_as_a_delta_equal_to_a_monolithic_index(indexed):
    bank = extend_bank(indexed, (700, 400), seed=11)  # v3: two more parts
    before = read_manifest(BankRef(bank.url)).index
    report = build_index(bank.url, CONFIG)
    assert report.mode == "delta" and report.version == "v000004"
    assert report.delta["vectors"] == 1100 and len(report.delta["parts"]) == 2
    assert set(report.timings_s) >= {"add", "lists", "text", "publish"} and "train" not in report.timings_s
    entry = read_manifest(BankRef(bank.url)).index
    assert entry.id == before.id and entry.trained == before.trained and entry.lists == before.lists
    assert len(entry.deltas) == 1 and entry.vectors == len(bank.ids)
    assert 0.5 < report.delta["drift_ratio"] < 1.5 and not report.delta["retrain_recommended"]  # same clusters
    _assert_equals_monolithic(bank, bank)
    _assert_equals_monolithic(bank, bank, budget_share=0.4)  # lists come and go: pieces fetched per source
    table = open_bank(bank.url).label_table()  # the label counts cover every part
    labels = np.array([bank.label_names[i] for i in range(len(bank.label_names))])
    assert table.counts.sum() == sum(open_bank(bank.url).labels(bank.ids).count(n) for n in labels)
    again = build_index(bank.url, CONFIG)  # nothing new: nothing published, and it says so
    assert again.mode == "up_to_date" and again.version is None
    assert list_versions(BankRef(bank.url))[-1] == "v000004"
    with pytest.raises(BankMismatchError, match="--retrain"):
        build_index(bank.url, replace(CONFIG, memory_target_bytes_per_vector=40))
    retrained = build_index(bank.url, CONFIG, retrain=True)
    assert retrained.mode == "full" and read_manifest(BankRef(bank.url)).index.deltas == []


def test_removals_hide_segments_from_search_and_lookup_at_once(indexed):
    bank, ref = indexed, BankRef(indexed.url)
    searcher = BankSearcher(open_bank(bank.url))
    q = clustered(np.random.default_rng(3), bank.centers, 5)
    _, hits = searcher.search(q, K)
    takedown = np.unique(hits[:, :3])
    counts_before = dict(zip(*[open_bank(bank.url).label_table().labels, open_bank(bank.url).label_table().counts]))
    report = remove_segments(bank.url, Removal(segment_ids=tuple(takedown.tolist()), reason="takedown #1"))
    assert (report.version, report.removed) == ("v000003", len(takedown))
    fresh = BankSearcher(open_bank(bank.url))  # the next request after publish opens the new version
    assert not np.isin(fresh.search(q, K)[1], takedown).any()
    with pytest.raises(KeyError, match="was removed"):
        fresh.bank.metadata([int(takedown[0])])
    _assert_equals_monolithic(bank, _survivors(bank, takedown))
    removed_labels = [n for n in open_bank(bank.url, "v000002").labels(takedown) if n is not None]
    counts_after = dict(zip(fresh.bank.label_table().labels, fresh.bank.label_table().counts))
    for name in set(removed_labels):
        assert counts_after.get(name, 0) == counts_before[name] - removed_labels.count(name)
    by_label = remove_segments(bank.url, Removal(labels=(bank.label_names[0],), reason="label retired"))
    assert by_label.removed > 0 and bank.label_names[0] not in open_bank(bank.url).label_table().labels
    again = remove_segments(bank.url, Removal(segment_ids=tuple(takedown.tolist()), reason="takedown #1"))
    assert again.version is None and again.already_removed == len(takedown)
    with pytest.raises(BankMismatchError, match="nothing matching image key 'no-such-image'"):
        remove_segments(bank.url, Removal(image_keys=("no-such-image",), reason="x"))
    assert [t.reason for t in read_manifest(ref).tombstones] == ["takedown #1", "label retired"]


def test_compaction_equals_a_fresh_index_of_the_survivors(indexed):
    bank = extend_bank(indexed, (600,), seed=12)
    build_index(bank.url, CONFIG)  # a delta
    removed = np.concatenate([bank.ids[:40], bank.ids[-25:]])  # some base and some delta segments
    remove_segments(bank.url, Removal(segment_ids=tuple(removed.tolist()), reason="cleanup"))
    before = read_manifest(BankRef(bank.url)).index
    report = compact_index(bank.url, object_bytes=64 << 10)
    assert report.folded_deltas == 1 and report.removed_vectors == len(removed)
    entry = read_manifest(BankRef(bank.url)).index
    assert entry.id != before.id and entry.deltas == [] and entry.vectors == len(bank.ids) - len(removed)
    assert entry.folded_tombstones == [t.object for t in read_manifest(BankRef(bank.url)).tombstones]
    _assert_equals_monolithic(bank, _survivors(bank, removed))
    assert compact_index(bank.url).version is None  # nothing left to fold


def test_gc_keeps_what_retained_versions_use_and_deletes_the_rest(indexed):
    bank = extend_bank(indexed, (500,), seed=13)  # v3
    build_index(bank.url, CONFIG)  # v4: a delta
    compact_index(bank.url)  # v5: a new index folder
    ref = BankRef(bank.url)
    pin(ref, "v000002")
    fs, root = ref.fs()
    existing = {path[len(root) + 1:] for path in fs.find(root)}
    dry = collect_garbage(bank.url, keep=1, grace_s=0, dry_run=True)
    assert dry.deleted and all(storage.exists(ref.url(name)) for name in dry.deleted)
    report = collect_garbage(bank.url, keep=1, grace_s=0)
    assert report.retained_versions == ["v000002", "v000005"] and sorted(report.deleted) == sorted(dry.deleted)
    assert list_versions(ref) == ["v000002", "v000005"]
    for version in ("v000002", "v000005"):  # every object a retained version uses is still there
        for name in referenced_objects(read_manifest(ref, version)) & existing:
            assert storage.exists(ref.url(name)), (version, name)
    assert any(name.startswith("versions/v000003/") for name in report.deleted)
    _assert_equals_monolithic(bank, bank)
    BankSearcher(open_bank(bank.url, version="v000002")).search(clustered(np.random.default_rng(1), bank.centers,
                                                                          3), K)
    storage.write_bytes(ref.url("parts", "in-flight.parquet"), b"a build writing right now")
    young = collect_garbage(bank.url, keep=1, grace_s=3600)
    assert "parts/in-flight.parquet" in young.kept_young and not young.deleted
    with pytest.raises(ValueError, match="keep must be"):
        collect_garbage(bank.url, keep=0)


def test_info_describes_versions_parts_index_deltas_and_tombstones(indexed):
    bank = extend_bank(indexed, (300,), seed=14)
    build_index(bank.url, CONFIG)
    remove_segments(bank.url, Removal(segment_ids=(int(bank.ids[0]),), reason="gdpr"))
    info = bank_info(bank.url)
    assert info["version"] == info["current"] == "v000005"
    assert [v["version"] for v in info["versions"]] == [f"v00000{i}" for i in range(1, 6)]
    assert info["versions"][-1]["parent"] == "v000004" and info["versions"][-1]["current"]
    assert len(info["parts"]) == 4 and info["totals"]["removed"] == 1
    assert info["tombstones"] == {"objects": 1, "segments": 1, "reasons": {"gdpr": 1}}
    assert info["index"]["vectors"] == len(bank.ids) and len(info["index"]["deltas"]) == 1
    assert info["index"]["deltas"][0]["vectors"] == 300 and info["index"]["parts_not_indexed"] == 0
    assert 0 < info["storage"]["version_bytes"] <= info["storage"]["bank_bytes"]
    assert bank_info(bank.url, version="v000002")["index"]["deltas"] == []


def test_two_writers_one_publishes_the_other_is_refused_and_nothing_is_half_visible(indexed, monkeypatch):
    bank, ref = indexed, BankRef(indexed.url)
    stale = versions.read_current(ref)
    assert remove_segments(bank.url, Removal(segment_ids=(int(bank.ids[1]),), reason="first")).version
    monkeypatch.setattr(remove_module, "read_current", lambda r: stale)  # the second planned from v000002 too
    with pytest.raises(ConcurrentUpdateError, match="CURRENT moved from v000002 to v000003"):
        remove_segments(bank.url, Removal(segment_ids=(int(bank.ids[2]),), reason="second"))
    assert list_versions(ref) == ["v000001", "v000002", "v000003"]
    assert [t.reason for t in read_manifest(ref).tombstones] == ["first"]
    assert not os.path.exists(ref.url("versions", "v000004"))


def test_a_killed_refresh_leaves_the_live_version_serving(indexed, tmp_path):
    """Objects of an unfinished delta are never named by a version: the live version serves as before, and a
    re-run finishes the job."""
    bank = extend_bank(indexed, (400,), seed=15)
    live = read_manifest(BankRef(bank.url)).version
    entry = read_manifest(BankRef(bank.url)).index
    half = BankRef(bank.url).url("index", entry.id, "deltas", "20990101T000000Z-dead00", "lists", "000000.bin")
    storage.write_bytes(half, b"half a list object")  # what a refresh killed mid-write leaves
    q = clustered(np.random.default_rng(2), bank.centers, 4)
    assert BankSearcher(open_bank(bank.url)).search(q, K)[1].shape == (4, K)
    assert read_manifest(BankRef(bank.url)).version == live
    assert build_index(bank.url, CONFIG).mode == "delta"
    _assert_equals_monolithic(bank, bank)
    time.sleep(0.05)
    assert "index/" + entry.id + "/deltas/20990101T000000Z-dead00/lists/000000.bin" in collect_garbage(
        bank.url, keep=1, grace_s=0).deleted
