"""The IVF index stored list by list: real faiss, real Ray, tiny seeded banks checked against brute force and
against one monolithic faiss index."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from bank_builder.format import BankMismatchError, BankRef, IndexCorruptError, read_manifest, storage
from bank_builder.format.index_layout import ListLayout, index_url, read_directory
from bank_builder.format.trained import read_trained
from bank_builder.index import IndexConfig, build_index, choose_params
from bank_builder.index.autotune import drop_self, recall_at_k, sweep
from bank_builder.index.exact import TopK, floors
from bank_builder.index.objects import plan_objects
from bank_builder.index.scan import ObjectScan
from bank_builder.index.train import locality_order
from index_helpers import Monolithic, assert_same_topk, clustered, exact_knn, make_bank
from query.bank import open_bank
from query.search import BankSearcher
from tests.build_helpers import read_bank

K = 10
# IVF-PQ with refine: d=48, 16-byte codes (id + code = 24 bytes), small list objects so there are many.
PQ_CONFIG = IndexConfig(memory_target_bytes_per_vector=24, flat_below=0, autotune_queries=200,
                        nprobe_candidates=(1, 2, 4, 8, 16, 32, 64), refine_factor=4, object_bytes=96 << 10)


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """A local 4-part bank (9000 vectors) with its IVF-PQ + refine index built once."""
    bank = make_bank(str(tmp_path_factory.mktemp("idx") / "bank"))
    report = build_index(bank.url, PQ_CONFIG)
    return bank, report


def _queries(bank, n=150, seed=1):
    return clustered(np.random.default_rng(seed), bank.centers, n)


def _entry(url, storage_options=None):
    return read_manifest(BankRef(url, storage_options or {})).index


def _searcher(url, storage_options=None):
    return BankSearcher(open_bank(url, storage_options=storage_options))


def _monolithic(url, bank, storage_options=None, refine=True):
    ref = BankRef(url, storage_options or {})
    return Monolithic(read_trained(ref, read_manifest(ref).index), bank, refine)


def _check_objects(bank, entry, storage_options=None):
    """Every segment id in exactly one list, once; each object holds a contiguous list range whose lists lie
    back to back in list order; checksums verify; every list decodes with numpy alone (documented layout)."""
    ref = BankRef(bank.url, storage_options or {})
    directory = read_directory(ref, entry)
    layout = ListLayout(entry.code_size, entry.dim, entry.refine)
    ids = []
    for n, obj in enumerate(entry.lists):
        lists = np.flatnonzero(directory["object"] == n)
        assert len(lists) and np.array_equal(lists, np.arange(lists[0], lists[-1] + 1))
        rows = directory[lists]
        assert rows["offset"][0] == 0 and (rows["offset"][1:] == rows["offset"][:-1] + rows["bytes"][:-1]).all()
        assert rows["offset"][-1] + rows["bytes"][-1] == obj.bytes
        data = storage.read_bytes(index_url(ref, entry.id, obj.object), ref.storage_options)
        for row in rows:
            blob = data[row["offset"]:row["offset"] + row["bytes"]]
            count = int(row["count"])
            ids.append(np.frombuffer(blob, "<i8", count))  # plain numpy: ids first, then codes, then vectors
            assert layout.decode(blob, count).codes.shape == (count, entry.code_size)
    ids = np.concatenate(ids)
    assert len(ids) == len(bank.ids) == entry.vectors
    np.testing.assert_array_equal(np.sort(ids), np.sort(bank.ids))
    return directory


def test_index_choice_follows_bank_size_and_memory_target():
    p = choose_params(1_000_000, 64, IndexConfig(memory_target_bytes_per_vector=40))
    assert (p.factory, p.kind, p.code_size, p.bytes_per_vector) == ("IVF4096,PQ32", "ivf-pq", 32, 40)
    p = choose_params(1_000_000, 512, IndexConfig(opq=True, train_sample=100_000))
    assert p.factory == "OPQ64_512,IVF2564,PQ64"  # 100k training vectors carry ≤ 100k // 39 lists
    assert choose_params(1_000_000, 64, IndexConfig()).factory == "IVF4096,SQ8"  # 64 code bytes fit SQ8
    assert choose_params(2000, 64, IndexConfig()).factory == "IVF46,Flat"  # small: exact codes, ≤ 1800/39 lists
    p = choose_params(50_000, 32, IndexConfig(factory="OPQ8_32,IVF64,PQ8"))
    assert (p.kind, p.nlist, p.code_size) == ("custom", 64, 8)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,PQ8x4fs", "IVF16,PQ8,RFlat", "IVF16,Nonsense"])
def test_unstorable_factories_are_refused_with_the_fix(factory):
    with pytest.raises(ValueError, match="factory|faiss cannot build"):
        choose_params(10_000, 32, IndexConfig(factory=factory))


def test_object_plan_is_contiguous_bounded_and_balanced():
    sizes = np.random.default_rng(0).integers(0, 1000, 500) * 8
    ranges = plan_objects(sizes, 200_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == 500 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    totals = [sizes[lo:hi].sum() for lo, hi in ranges]
    assert max(totals) <= 200_000 and len(ranges) == -(-sizes.sum() // 200_000)  # fewest objects possible here
    assert max(totals) - min(totals) < 0.25 * 200_000  # balanced, not greedy-full then a small tail
    assert plan_objects(np.array([10, 5000, 10]), 100) == [(0, 1), (1, 2), (2, 3)]  # a huge list stands alone


def test_locality_order_keeps_nearby_centroids_in_nearby_lists():
    rng = np.random.default_rng(5)
    centroids = clustered(rng, rng.standard_normal((40, 32)), 1500).astype(np.float32)
    order = locality_order(centroids)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(centroids)))

    def mean_gap(perm):  # how far apart, in list numbers, each centroid is from its 8 nearest centroids
        position = np.argsort(perm)
        scores = centroids @ centroids.T
        np.fill_diagonal(scores, -np.inf)
        nearest = np.argsort(-scores, axis=1)[:, :8]
        return np.abs(position[nearest] - position[:, None]).mean()

    assert mean_gap(order) < 0.4 * mean_gap(np.arange(len(centroids)))  # k-means order: ~n/3, no locality


def test_a_querys_probed_lists_lie_close_together(built):
    """Locality order: the probed lists of a query form few runs of neighbouring lists (few ranged reads)."""
    bank, _ = built
    entry = _entry(bank.url)
    trained = read_trained(BankRef(bank.url), entry)  # keep it: the IVF below is a view into it
    _, lists = faiss.extract_index_ivf(trained).quantizer.search(_queries(bank), 8)

    def runs_per_query(list_numbers):  # runs of lists within 4 of each other: what one coalesced read can cover
        return np.mean([1 + int((np.diff(np.sort(row)) > 4).sum()) for row in list_numbers])

    shuffled = np.random.default_rng(0).permutation(entry.nlist)  # what arbitrary list numbers would give
    assert runs_per_query(lists) < 0.7 * runs_per_query(shuffled[lists])


def test_every_segment_is_in_exactly_one_list_once(built):
    bank, report = built
    entry = _entry(bank.url)
    assert (report.kind, report.code_size, report.nlist) == ("ivf-pq", 16, entry.nlist) and report.objects > 3
    directory = _check_objects(bank, entry)
    assert (directory["bytes"] == directory["count"] * (8 + 16 + 2 * 48)).all()  # refine vectors travel along
    assert max(o.bytes for o in entry.lists) <= PQ_CONFIG.object_bytes + int(directory["bytes"].max())


@pytest.mark.parametrize("nprobe", [1, 7, None], ids=["nprobe1", "nprobe7", "all-lists"])
def test_search_equals_one_monolithic_faiss_index(built, nprobe):
    bank, _ = built
    entry = _entry(bank.url)
    nprobe = nprobe or entry.nlist
    searcher, mono = _searcher(bank.url), _monolithic(bank.url, bank)
    q = _queries(bank)
    plain, plain_mono = searcher.search(q, K, nprobe, refine_factor=0), mono.search(q, K, nprobe)
    np.testing.assert_array_equal(plain[1], plain_mono[1])
    np.testing.assert_array_equal(plain[0], plain_mono[0])  # the same codes, scanned the same way
    refined, refined_mono = searcher.search(q, K, nprobe, refine_factor=4), mono.search(q, K, nprobe, 4)
    np.testing.assert_array_equal(refined[1], refined_mono[1])
    np.testing.assert_allclose(refined[0], refined_mono[0], rtol=1e-6, atol=1e-7)  # float32 summation order


def test_autotuned_nprobe_with_refine_reaches_target_recall(built):
    bank, report = built
    entry = _entry(bank.url)
    curve = report.curve
    assert [p["nprobe"] for p in curve] == [1, 2, 4, 8, 16, 32, 64]
    recalls = [p["recall_at_k"] for p in curve]
    assert all(b >= a - 0.02 for a, b in zip(recalls, recalls[1:]))  # monotone up to sampling noise
    chosen = [p["nprobe"] for p in curve if p["recall_at_k"] >= PQ_CONFIG.target_recall][0]
    assert report.nprobe == entry.nprobe == chosen and report.target_met and report.refine_factor == 4
    q = _queries(bank, 300, seed=7)  # fresh queries, not bank vectors: recall must hold beyond the tuning set
    _, truth = exact_knn(bank, q, K)
    searcher = _searcher(bank.url)
    _, found = searcher.search(q, K)  # defaults: the tuned nprobe and refine factor
    assert recall_at_k(found, truth) >= 0.95
    _, plain = searcher.search(q, K, refine_factor=0)
    assert recall_at_k(found, truth) >= recall_at_k(plain, truth)


def test_autotune_sweep_equals_search(built):
    bank, _ = built
    ref, entry = BankRef(bank.url), _entry(bank.url)
    scan = ObjectScan(read_trained(ref, entry), ref, entry.id, entry.lists,
                      ListLayout(entry.code_size, entry.dim, entry.refine), read_directory(ref, entry))
    searcher = _searcher(bank.url)
    q = _queries(bank, 60, seed=11)
    ids, seconds, _ = sweep(scan, q, [1, 4, 16], K, 4)  # one pass over the list objects for every nprobe
    for nprobe in (1, 4, 16):
        np.testing.assert_array_equal(ids["plain"][nprobe], searcher.search(q, K, nprobe, refine_factor=0)[1])
        np.testing.assert_array_equal(ids["refine"][nprobe], searcher.search(q, K, nprobe, refine_factor=4)[1])
        assert seconds["refine"][nprobe] > 0


def test_refined_scores_are_exact_inner_products(built):
    bank, _ = built
    q = _queries(bank, 20, seed=3)
    scores, ids = _searcher(bank.url).search(q, K, nprobe=_entry(bank.url).nlist)
    rows = np.searchsorted(bank.ids, ids)
    exact = np.einsum("qd,qkd->qk", q, bank.vectors[rows].astype(np.float32))
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_version_manifest_report_and_plain_formats(built):
    bank, report = built
    ref = BankRef(bank.url)
    m = read_manifest(ref)
    assert report.version == m.version == "v000002" and report.source_version == m.parent == "v000001"
    assert m.parts == read_manifest(ref, "v000001").parts
    entry = m.index
    base = index_url(ref, entry.id)
    assert not os.path.exists(os.path.join(base, "staging"))
    on_disk = faiss.read_index(os.path.join(base, entry.trained.object))  # plain faiss, no pickle
    assert on_disk.is_trained and on_disk.ntotal == 0 and faiss.extract_index_ivf(on_disk).nlist == entry.nlist
    directory = np.load(os.path.join(base, entry.directory.object), allow_pickle=False)  # plain numpy
    assert directory.shape == (entry.nlist,) and directory["count"].sum() == entry.vectors
    with np.load(os.path.join(base, entry.text.object), allow_pickle=False) as z:
        assert all(z[f].dtype != object for f in z.files)
    rep = json.loads(open(os.path.join(base, "report.json")).read())
    assert rep["autotune"]["nprobe"] == entry.nprobe and rep["params"]["factory"] == entry.factory
    assert {"sample", "train", "add", "lists", "text", "autotune"} <= set(rep["timings_s"])
    assert rep["bytes"]["total"] == entry.trained.bytes + entry.directory.bytes + \
        sum(o.bytes for o in entry.lists) + entry.text.bytes


def test_a_changed_list_is_detected_before_it_is_searched(built):
    bank, _ = built
    ref, entry = BankRef(bank.url), _entry(bank.url)
    directory = read_directory(ref, entry)
    target = int(np.flatnonzero(directory["count"] > 0)[0])
    path = index_url(ref, entry.id, entry.lists[int(directory["object"][target])].object)
    original = open(path, "rb").read()
    at = int(directory["offset"][target]) + 3  # a byte inside the list's ids
    try:
        open(path, "wb").write(original[:at] + bytes([original[at] ^ 1]) + original[at + 1:])
        with pytest.raises(IndexCorruptError, match=f"list {target} in .* does not match its checksum"):
            _searcher(bank.url).search(_queries(bank, 5), K, nprobe=entry.nlist)
    finally:
        open(path, "wb").write(original)


def test_label_table_carries_each_labels_text_and_visual_prototype(built):
    bank, _ = built
    table = open_bank(bank.url).label_table()
    assert table.labels == bank.label_names
    np.testing.assert_allclose(table.text, bank.label_text.astype(np.float32), atol=1e-3)
    rows = read_bank(bank.url)
    labels = np.array(rows["label"].to_pylist(), dtype=object)
    visual = np.stack(rows["visual_embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
    for i, name in enumerate(table.labels):  # brute force: the mean of the label's rows, L2-normalised
        mean = visual[labels == name].sum(axis=0)
        np.testing.assert_allclose(table.prototypes[i], mean / np.linalg.norm(mean), atol=2e-3)
        assert table.counts[i] == int((labels == name).sum())


@pytest.mark.parametrize("factory", ["IVF32,Flat", "OPQ8_48,IVF32,PQ8", "IVF32,SQ8"])
def test_ivf_variants_are_stored_and_searched_alike(ray_local, tmp_path, factory):
    bank = make_bank(str(tmp_path / "bank"), part_rows=(900, 1300, 700), seed=2)
    config = IndexConfig(factory=factory, refine=False, autotune_queries=100, object_bytes=16 << 10,
                         nprobe_candidates=(1, 4, 16, 32), target_recall=0.5)
    report = build_index(bank.url, config)
    entry = _entry(bank.url)
    assert report.factory == factory and report.objects > 1 and entry.refine_factor == 0
    directory = _check_objects(bank, entry)
    assert (directory["bytes"] == directory["count"] * (8 + entry.code_size)).all()  # no refine vectors
    q = _queries(bank, 80)
    mono = _monolithic(bank.url, bank, refine=False)
    searcher = _searcher(bank.url)
    d, i = searcher.search(q, K, nprobe=4)
    np.testing.assert_array_equal(i, mono.search(q, K, 4)[1])
    assert_same_topk(d, i, *mono.search(q, K, 4))
    with pytest.raises(ValueError, match="refine=True"):
        searcher.search(q, K, refine_factor=2)


def test_build_on_s3_then_read_back_and_search(ray_local, s3):
    options, bucket = s3
    bank = make_bank(f"s3://{bucket}/bank", part_rows=(1200, 900), seed=3, storage_options=options)
    config = IndexConfig(flat_below=0, memory_target_bytes_per_vector=24, autotune_queries=100,
                         nprobe_candidates=(1, 4, 16, 64), object_bytes=48 << 10)
    report = build_index(bank.url, config, storage_options=options)
    assert report.version == "v000002" and report.report.startswith(f"s3://{bucket}/bank/index/")
    entry = _entry(bank.url, options)
    _check_objects(bank, entry, options)
    q = _queries(bank, 100)
    _, truth = exact_knn(bank, q, K)
    searcher = _searcher(bank.url, options)
    _, found = searcher.search(q, K, nprobe=entry.nlist)
    assert recall_at_k(found, truth) >= 0.95
    assert open_bank(bank.url, storage_options=options).label_table().labels == bank.label_names
    fs = BankRef(bank.url, options).fs()[0]
    assert not fs.exists(f"{bucket}/bank/index/{entry.id}/staging")


def test_index_needs_a_published_bank(tmp_path):
    with pytest.raises(BankMismatchError, match="no bank at .*nothing is stored there; check the path"):
        build_index(str(tmp_path / "empty"))
    (tmp_path / "started" / "parts").mkdir(parents=True)  # a first build that has not published yet
    with pytest.raises(BankMismatchError, match="has no published version .*refbank build"):
        build_index(str(tmp_path / "started"))
    with pytest.raises(BankMismatchError, match="no index"):
        make_bank(str(tmp_path / "b"), part_rows=(50,))
        _searcher(str(tmp_path / "b"))


def test_only_current_can_be_indexed(built):
    bank, _ = built
    with pytest.raises(BankMismatchError, match="not CURRENT"):
        build_index(bank.url, PQ_CONFIG, version="v000001")


def test_index_package_stays_light_for_ray_workers():
    """Workers import the package of every task they run: bank_builder.index must not pull in torch."""
    code = "import sys, bank_builder.index; print(sorted({'torch', 'open_clip', 'timm'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_leave_one_out_recall_helpers():
    ids = np.array([[7, 1, 2, 3], [4, 5, 6, 8]])
    np.testing.assert_array_equal(drop_self(ids, np.array([7, 9]), 3), [[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(np.array([[1, 2, 9]]), np.array([[1, 2, 3]])) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, -1]]), np.array([[1, -1]])) == 1.0


@pytest.mark.parametrize("floored", [False, True])
def test_streamed_exact_topk_equals_brute_force(floored):
    """The autotune's ground truth: blocks and parts of any size (fewer rows than k too), merged across parts;
    with floors from a sample of the vectors, the same result."""
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    parts = [rng.standard_normal((n, 16)).astype(np.float32) for n in (3, 2500, 1, 4000)]
    ids = np.split(rng.permutation(10_000)[:sum(len(p) for p in parts)], np.cumsum([len(p) for p in parts])[:-1])
    everything = np.concatenate(parts)
    floor = floors(queries, everything[rng.choice(len(everything), 300, replace=False)], K + 1) if floored else None
    total = TopK(queries, K + 1)
    for x, i in zip(parts, ids):
        part = TopK(queries, K + 1, floor)
        part.add(x, i)
        total.merge(part.scores, part.ids)
    scores = queries @ everything.T
    best = np.argsort(-scores, axis=1)[:, :K + 1]
    np.testing.assert_array_equal(total.ids, np.concatenate(ids)[best])
    np.testing.assert_allclose(total.scores, np.take_along_axis(scores, best, axis=1), rtol=1e-5)
    if floored:  # the floors are real lower bounds, and close enough to prune nearly every score
        assert (floor <= total.scores[:, -1]).all() and np.mean(scores >= floor[:, None]) < 0.1
    small = TopK(queries, K + 1)
    small.add(parts[0], ids[0])
    assert (small.ids[:, 3:] == -1).all() and np.isneginf(small.scores[:, 3:]).all()


def test_floors_of_a_sample_smaller_than_k_prune_nothing():
    queries = np.eye(4, dtype=np.float32)
    assert np.isneginf(floors(queries, queries[:2], 3)).all()
