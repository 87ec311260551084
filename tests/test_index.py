"""The sliced IVF index: real faiss, real Ray, tiny seeded banks checked against brute force."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from bank_builder import manifest, storage
from bank_builder.index import (IndexConfig, IndexCorruptError, SliceArrays, build_index, choose_params, index_entry,
                                open_index, open_text_index)
from bank_builder.index.autotune import drop_self, recall_at_k, sweep
from bank_builder.index.exact import TopK, floors
from bank_builder.index.layout import index_dir
from bank_builder.index.slices import plan_slices
from bank_builder.index.train import deserialize, locality_order
from tests.build_helpers import read_bank
from index_helpers import assert_same_topk, clustered, exact_knn, make_bank, monolithic_search

K = 10
# IVF-PQ with refine: d=48, 16-byte codes (id + code = 24 bytes), small slices so there are many.
PQ_CONFIG = IndexConfig(memory_target_bytes_per_vector=24, flat_below=0, autotune_queries=200,
                        nprobe_candidates=(1, 2, 4, 8, 16, 32, 64), refine_factor=4, slice_bytes=96 << 10)


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """A local 4-part bank (9000 vectors) with its IVF-PQ + refine index built once."""
    bank = make_bank(str(tmp_path_factory.mktemp("idx") / "bank"))
    report = build_index(bank.url, PQ_CONFIG)
    return bank, report


def _queries(bank, n=150, seed=1):
    return clustered(np.random.default_rng(seed), bank.centers, n)


def _slices(bank_url, entry, storage_options=None):
    base = index_dir(bank_url, entry["id"])
    return [SliceArrays.from_bytes(storage.read_bytes(storage.join(base, s["object"]), storage_options))
            for s in entry["slices"]]


def _check_slices(bank, entry, storage_options=None):
    """Every segment id in exactly one slice, once; list ranges tile 0..nlist; checksums and offsets agree."""
    slices = _slices(bank.url, entry, storage_options)
    ranges = [tuple(s["lists"]) for s in entry["slices"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == entry["nlist"]
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
    ids = np.concatenate([s.ids for s in slices])
    assert len(ids) == len(bank.ids) == entry["vectors"]
    np.testing.assert_array_equal(np.sort(ids), np.sort(bank.ids))
    for s, e in zip(slices, entry["slices"]):
        assert (s.lo, s.hi) == tuple(e["lists"]) and s.offsets[-1] == len(s) == e["vectors"]
        assert s.codes.shape == (len(s), entry["code_size"]) and s.codes.dtype == np.uint8
    return slices


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
def test_unsliceable_factories_are_refused_with_the_fix(factory):
    with pytest.raises(ValueError, match="factory|faiss cannot build"):
        choose_params(10_000, 32, IndexConfig(factory=factory))


def test_slice_plan_is_contiguous_bounded_and_balanced():
    sizes = np.random.default_rng(0).integers(0, 1000, 500) * 8
    ranges = plan_slices(sizes, 200_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == 500 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    totals = [sizes[lo:hi].sum() for lo, hi in ranges]
    assert max(totals) <= 200_000 and len(ranges) == -(-sizes.sum() // 200_000)  # fewest slices possible here
    assert max(totals) - min(totals) < 0.25 * 200_000  # balanced, not greedy-full then a small tail
    assert plan_slices(np.array([10, 5000, 10]), 100) == [(0, 1), (1, 2), (2, 3)]  # a huge list stands alone


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


def test_a_query_touches_few_slices(built):
    bank, _ = built
    entry = index_entry(bank.url)
    trained = deserialize(storage.read_bytes(storage.join(index_dir(bank.url, entry["id"]), "trained.faissindex")))
    ivf = faiss.extract_index_ivf(trained)
    _, lists = ivf.quantizer.search(_queries(bank), 8)
    starts = np.array([s["lists"][0] for s in entry["slices"]])

    def slices_per_query(list_numbers):
        owners = np.searchsorted(starts, list_numbers, side="right") - 1
        return np.mean([len(np.unique(row)) for row in owners])

    shuffled = np.random.default_rng(0).permutation(entry["nlist"])  # what arbitrary list numbers would give
    assert len(entry["slices"]) >= 8
    assert slices_per_query(lists) < 0.6 * slices_per_query(shuffled[lists])


def test_every_segment_is_in_exactly_one_slice_once(built):
    bank, report = built
    entry = index_entry(bank.url)
    assert (report.kind, report.code_size, report.nlist) == ("ivf-pq", 16, entry["nlist"]) and report.slices > 3
    slices = _check_slices(bank, entry)
    assert all(s.vectors is not None and s.vectors.dtype == np.float16 for s in slices)
    assert max(e["bytes"] for e in entry["slices"]) <= PQ_CONFIG.slice_bytes + 4096  # + npz headers


def test_sliced_search_equals_monolithic_faiss(built):
    bank, _ = built
    entry = index_entry(bank.url)
    sliced = open_index(bank.url, max_resident=3)  # an LRU smaller than the slice count: evictions on the way
    trained = deserialize(storage.read_bytes(storage.join(index_dir(bank.url, entry["id"]), "trained.faissindex")))
    q = _queries(bank)
    for nprobe in (1, 7, entry["nlist"]):
        d_mono, i_mono = monolithic_search(deserialize(faiss.serialize_index(trained).tobytes()), bank, q, K, nprobe)
        d_sliced, i_sliced = sliced.search(q, K, nprobe=nprobe, refine_factor=0)
        assert_same_topk(d_sliced, i_sliced, d_mono, i_mono)


def test_autotuned_nprobe_with_refine_reaches_target_recall(built):
    bank, report = built
    entry = index_entry(bank.url)
    curve = report.curve
    assert [p["nprobe"] for p in curve] == [1, 2, 4, 8, 16, 32, 64]
    recalls = [p["recall_at_k"] for p in curve]
    assert all(b >= a - 0.02 for a, b in zip(recalls, recalls[1:]))  # monotone up to sampling noise
    chosen = [p["nprobe"] for p in curve if p["recall_at_k"] >= PQ_CONFIG.target_recall][0]
    assert report.nprobe == entry["nprobe"] == chosen and report.target_met and report.refine_factor == 4
    q = _queries(bank, 300, seed=7)  # fresh queries, not bank vectors: recall must hold beyond the tuning set
    _, truth = exact_knn(bank, q, K)
    _, found = open_index(bank.url).search(q, K)  # defaults: the tuned nprobe and refine factor
    assert recall_at_k(found, truth) >= 0.95
    _, plain = open_index(bank.url).search(q, K, refine_factor=0)
    assert recall_at_k(found, truth) >= recall_at_k(plain, truth)


def test_autotune_sweep_equals_search(built):
    bank, _ = built
    index = open_index(bank.url)
    q = _queries(bank, 60, seed=11)
    ids, seconds, _ = sweep(index, q, [1, 4, 16], K, 4)  # one pass over the slices for every nprobe
    for nprobe in (1, 4, 16):
        np.testing.assert_array_equal(ids["plain"][nprobe], index.search(q, K, nprobe, refine_factor=0)[1])
        np.testing.assert_array_equal(ids["refine"][nprobe], index.search(q, K, nprobe, refine_factor=4)[1])
        assert seconds["refine"][nprobe] > 0


def test_refined_scores_are_exact_inner_products(built):
    bank, _ = built
    q = _queries(bank, 20, seed=3)
    scores, ids = open_index(bank.url).search(q, K, nprobe=index_entry(bank.url)["nlist"])
    rows = np.searchsorted(bank.ids, ids)
    exact = np.einsum("qd,qkd->qk", q, bank.vectors[rows].astype(np.float32))
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_version_manifest_report_and_plain_formats(built):
    bank, report = built
    m = manifest.read_manifest(bank.url)
    assert report.version == m["version"] == "v000002" and report.source_version == m["parent"] == "v000001"
    assert m["parts"] == manifest.read_manifest(bank.url, "v000001")["parts"]
    entry = m["index"]
    base = index_dir(bank.url, entry["id"])
    assert entry["path"] == f"index/{entry['id']}" and not entry["path"].startswith("/")
    assert not os.path.exists(os.path.join(base, "staging"))
    on_disk = faiss.read_index(os.path.join(base, entry["trained"]["object"]))  # plain faiss, no pickle
    assert on_disk.is_trained and on_disk.ntotal == 0 and faiss.extract_index_ivf(on_disk).nlist == entry["nlist"]
    for name in [s["object"] for s in entry["slices"]] + [entry["text"]["object"]]:
        with np.load(os.path.join(base, name), allow_pickle=False) as z:
            assert all(z[f].dtype != object for f in z.files)
    rep = json.loads(open(os.path.join(base, "report.json")).read())
    assert rep["autotune"]["nprobe"] == entry["nprobe"] and rep["params"]["factory"] == entry["factory"]
    assert {"sample", "train", "add", "slices", "text", "autotune"} <= set(rep["timings_s"])
    assert rep["bytes"]["total"] == entry["trained"]["bytes"] + sum(s["bytes"] for s in entry["slices"]) + \
        entry["text"]["bytes"]


def test_corrupt_slice_is_detected(built, tmp_path):
    bank, _ = built
    entry = index_entry(bank.url)
    path = os.path.join(index_dir(bank.url, entry["id"]), entry["slices"][0]["object"])
    original = open(path, "rb").read()
    try:
        open(path, "wb").write(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(IndexCorruptError, match="checksum"):
            open_index(bank.url).search(_queries(bank, 5), K, nprobe=entry["nlist"])
    finally:
        open(path, "wb").write(original)


def test_text_index_returns_the_exact_nearest_label(built):
    bank, _ = built
    text = open_text_index(bank.url)
    assert text.labels == bank.label_names
    rng = np.random.default_rng(5)
    q = bank.label_text.astype(np.float32) + 0.3 * rng.standard_normal(bank.label_text.shape).astype(np.float32)
    scores, labels = text.search(q, k=3)
    expected = np.argsort(-(q @ bank.label_text.astype(np.float32).T), axis=1)[:, :3]
    assert labels == [[bank.label_names[j] for j in row] for row in expected]
    assert scores.shape == (len(q), 3)


def test_text_index_carries_each_labels_visual_prototype(built):
    bank, _ = built
    text = open_text_index(bank.url)
    rows = read_bank(bank.url)
    labels = np.array(rows["label"].to_pylist(), dtype=object)
    visual = np.stack(rows["visual_embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
    for i, name in enumerate(text.labels):  # brute force: the mean of the label's rows, L2-normalised
        mean = visual[labels == name].sum(axis=0)
        np.testing.assert_allclose(text.prototypes[i], mean / np.linalg.norm(mean), atol=2e-3)
        assert text.counts[i] == int((labels == name).sum())


@pytest.mark.parametrize("factory", ["IVF32,Flat", "OPQ8_48,IVF32,PQ8", "IVF32,SQ8"])
def test_ivf_variants_share_the_slice_machinery(ray_local, tmp_path, factory):
    bank = make_bank(str(tmp_path / "bank"), part_rows=(900, 1300, 700), seed=2)
    config = IndexConfig(factory=factory, refine=False, autotune_queries=100, slice_bytes=16 << 10,
                         nprobe_candidates=(1, 4, 16, 32), target_recall=0.5)
    report = build_index(bank.url, config)
    entry = index_entry(bank.url)
    assert report.factory == factory and report.slices > 1 and entry["refine_factor"] == 0
    slices = _check_slices(bank, entry)
    assert all(s.vectors is None for s in slices)
    trained = deserialize(storage.read_bytes(storage.join(index_dir(bank.url, entry["id"]), "trained.faissindex")))
    q = _queries(bank, 80)
    d_mono, i_mono = monolithic_search(trained, bank, q, K, 4)
    d_sliced, i_sliced = open_index(bank.url).search(q, K, nprobe=4)
    assert_same_topk(d_sliced, i_sliced, d_mono, i_mono)
    with pytest.raises(ValueError, match="refine=True"):
        open_index(bank.url).search(q, K, refine_factor=2)


def test_build_on_s3_then_read_back_and_search(ray_local, s3):
    options, bucket = s3
    bank = make_bank(f"s3://{bucket}/bank", part_rows=(1200, 900), seed=3, storage_options=options)
    config = IndexConfig(flat_below=0, memory_target_bytes_per_vector=24, autotune_queries=100,
                         nprobe_candidates=(1, 4, 16, 64), slice_bytes=48 << 10)
    report = build_index(bank.url, config, storage_options=options)
    assert report.version == "v000002" and report.report.startswith(f"s3://{bucket}/bank/index/")
    entry = index_entry(bank.url, storage_options=options)
    _check_slices(bank, entry, options)
    q = _queries(bank, 100)
    _, truth = exact_knn(bank, q, K)
    _, found = open_index(bank.url, storage_options=options).search(q, K, nprobe=entry["nlist"])
    assert recall_at_k(found, truth) >= 0.95
    assert open_text_index(bank.url, storage_options=options).labels == bank.label_names
    assert not storage.url_to_fs(f"s3://{bucket}/bank", options)[0].exists(
        f"{bucket}/bank/index/{entry['id']}/staging")


def test_index_needs_a_published_bank(tmp_path):
    with pytest.raises(manifest.BankMismatchError, match="refbank build"):
        build_index(str(tmp_path / "empty"))
    with pytest.raises(manifest.BankMismatchError, match="no index"):
        make_bank(str(tmp_path / "b"), part_rows=(50,))
        open_index(str(tmp_path / "b"))


def test_only_current_can_be_indexed(built):
    bank, _ = built
    with pytest.raises(manifest.BankMismatchError, match="not CURRENT"):
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
