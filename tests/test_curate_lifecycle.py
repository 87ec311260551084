"""Curation through a bank's life: the index holds exactly the kept segments (checked against a monolithic faiss
index of them), label prototypes are their means, new parts stay uncurated until curated again, a changed
curation rebuilds the index, removals and compaction compose with it, gc keeps what retained versions use, and a
concurrent writer leaves nothing half visible. Synthetic parts (no encoder): labels and vectors drawn at random."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

from bank_builder.curate import CurationConfig, curate_bank
from bank_builder.curate import run as curate_run
from bank_builder.format import BankRef, ConcurrentUpdateError, list_versions, parts, read_manifest, storage
from bank_builder.format.curation import REASONS, read_decisions
from bank_builder.format.index_layout import read_label_table
from bank_builder.index import build_index
from bank_builder.index.build import recurated_parts
from bank_builder.index.compact import compact_index
from bank_builder.lifecycle import Removal, bank_info, collect_garbage, remove_segments
from bank_builder.lifecycle.gc import referenced_objects
from index_helpers import SyntheticBank, extend_bank, make_bank
from test_lifecycle import CONFIG, _assert_equals_monolithic

pytestmark = pytest.mark.usefixtures("ray_local")
STRICT = CurationConfig(outlier_z=1.0, refine_rounds=1)  # random labels: a tight cut drops a good share of each group


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_local):
    """An uncurated 3-part bank (the 5000-row part spans two row groups) and a copy of it curated once."""
    root = tmp_path_factory.mktemp("curate-life")
    bank = make_bank(str(root / "raw"), part_rows=(1500, 5000, 800), seed=21)
    shutil.copytree(bank.url, root / "curated")
    curate_bank(str(root / "curated"), STRICT)
    return bank, replace(bank, url=str(root / "curated"))


@pytest.fixture
def curated(base, tmp_path) -> SyntheticBank:
    shutil.copytree(base[1].url, tmp_path / "bank")
    return replace(base[1], url=str(tmp_path / "bank"))


def _kept(bank: SyntheticBank) -> tuple[SyntheticBank, np.ndarray]:
    """(the bank less what CURRENT's curation drops — curated parts only —, the keep mask over bank.ids)."""
    m = read_manifest(BankRef(bank.url))
    keep = np.ones(len(bank.ids), bool)
    for c in m.curation.parts:
        d = read_decisions(BankRef(bank.url), c)
        keep[np.isin(bank.ids, d.segment_id)] = d.keep
    return replace(bank, vectors=bank.vectors[keep], ids=bank.ids[keep]), keep


def _labels(bank: SyntheticBank) -> np.ndarray:
    ref = BankRef(bank.url)
    return np.array([x for p in read_manifest(ref).parts for x in parts.read_part(ref, p)["label"].to_pylist()],
                    object)


def test_the_same_bank_gets_the_same_decisions(base, tmp_path):
    raw, curated = base
    shutil.copytree(raw.url, tmp_path / "again")
    report = curate_bank(str(tmp_path / "again"), STRICT)
    m, first = read_manifest(BankRef(str(tmp_path / "again"))), read_manifest(BankRef(curated.url))
    assert [c.object for c in m.curation.parts] == [c.object for c in first.curation.parts]
    assert m.curation.report == first.curation.report and m.curation.options == first.curation.options
    assert curate_bank(str(tmp_path / "again"), STRICT).version is None  # nothing new: nothing published
    assert report.kept + report.dropped == len(raw.ids) and 0 < report.dropped_by_reason["outlier"]
    d = read_decisions(BankRef(curated.url), first.curation.parts[1])
    assert d.segment_id.tolist() == [parts.segment_id(1, r) for r in range(5000)]
    assert set(d.reason) <= {None, *REASONS} and all((r is None) == k for r, k in zip(d.reason, d.keep))
    labels = _labels(raw)[np.isin(raw.ids, d.segment_id)]
    assert {r for r, label in zip(d.reason, labels) if label is None} == {"unpaired"}
    assert np.isnan(d.score[labels == None]).all() and not np.isnan(d.score[labels != None]).any()  # noqa: E711
    assert first.parts == read_manifest(BankRef(raw.url)).parts  # the parts are the uncurated bank's, untouched


def test_the_index_holds_exactly_the_kept_segments_and_prototypes_are_their_means(curated):
    assert build_index(curated.url, CONFIG).mode == "full"
    ref = BankRef(curated.url)
    m = read_manifest(ref)
    kept, keep = _kept(curated)
    assert m.index.vectors == m.curation.kept == len(kept.ids) < len(curated.ids)
    assert m.index.curation == {c.part: c.object for c in m.curation.parts} and recurated_parts(m) == []
    _assert_equals_monolithic(curated, kept)
    table, labels = read_label_table(ref, m.index), _labels(curated)
    for name, count, sums in zip(table.labels, table.counts, table.sums):
        rows = keep & (labels == name)
        assert count == rows.sum()
        np.testing.assert_allclose(sums, curated.vectors[rows].astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-6)
    info = bank_info(curated.url)["curation"]
    assert info["index_follows"] and info["parts_curated"] == 3 and info["kept"] == m.curation.kept
    assert sum(entry["kept"] for entry in info["labels"]) + info["unlabelled"]["kept"] == m.curation.kept


def test_new_parts_stay_uncurated_until_curated_again_then_the_index_follows(curated):
    build_index(curated.url, CONFIG)
    bank = extend_bank(curated, (700,), seed=22)
    ref = BankRef(bank.url)
    m = read_manifest(ref)
    assert m.curation is not None and m.curated(m.parts[-1].name) is None
    assert bank_info(bank.url)["curation"]["parts_not_curated"] == 1
    delta = build_index(bank.url, CONFIG)
    assert delta.mode == "delta" and delta.delta["vectors"] == 700  # an uncurated part: every row
    kept, _ = _kept(bank)
    _assert_equals_monolithic(bank, kept)
    curate_bank(bank.url, STRICT)
    m = read_manifest(ref)
    assert len(m.curation.parts) == 4 and recurated_parts(m)  # the groups moved: older decisions changed too
    assert not bank_info(bank.url)["curation"]["index_follows"]
    assert build_index(bank.url, CONFIG).mode == "full"
    m = read_manifest(ref)
    assert recurated_parts(m) == [] and m.index.vectors == m.curation.kept
    _assert_equals_monolithic(bank, _kept(bank)[0])


def test_removals_and_compaction_compose_with_curation(curated):
    build_index(curated.url, CONFIG)
    ref = BankRef(curated.url)
    kept, keep = _kept(curated)
    labels = _labels(curated)
    dropped = curated.ids[~keep & (labels != None)][:3]  # noqa: E711 - labelled segments curation dropped
    taken = curated.ids[keep][:5]
    before = read_label_table(ref, read_manifest(ref).index)
    remove_segments(curated.url, Removal(segment_ids=tuple(np.concatenate([dropped, taken]).tolist()), reason="x"))
    after = read_label_table(ref, read_manifest(ref).index)
    names, counts = np.unique(labels[np.isin(curated.ids, taken)].astype(str), return_counts=True)
    now = dict(zip(after.labels, after.counts.tolist()))
    change = {n: c - now.get(n, 0) for n, c in zip(before.labels, before.counts.tolist()) if c != now.get(n, 0)}
    assert change == dict(zip(names.tolist(), counts.tolist()))  # only indexed segments left the label table
    report = compact_index(curated.url, object_bytes=64 << 10)
    assert report.removed_vectors == len(taken)  # dropped segments were never in the lists
    survivors = replace(kept, vectors=kept.vectors[~np.isin(kept.ids, taken)], ids=kept.ids[~np.isin(kept.ids, taken)])
    _assert_equals_monolithic(curated, survivors)
    again = curate_bank(curated.url, STRICT)
    reasons = {int(i): r for c in read_manifest(ref).curation.parts for i, r in zip(*_ids_reasons(ref, c))}
    assert {reasons[int(i)] for i in np.concatenate([dropped, taken])} == {"removed"}
    assert again.dropped_by_reason["removed"] == len(dropped) + len(taken)


def _ids_reasons(ref: BankRef, curated) -> tuple[np.ndarray, list]:
    d = read_decisions(ref, curated)
    return d.segment_id, d.reason


def test_gc_keeps_the_curation_of_retained_versions_and_drops_superseded_ones(curated):
    ref = BankRef(curated.url)
    old = read_manifest(ref).curation
    curate_bank(curated.url, CurationConfig(outlier_z=2.0))  # v3: other decisions
    build_index(curated.url, CONFIG)  # v4
    m = read_manifest(ref)
    fs, root = ref.fs()
    existing = {path[len(root) + 1:] for path in fs.find(root)}  # synthetic parts have no rejects objects
    report = collect_garbage(curated.url, keep=1, grace_s=0)
    assert report.retained_versions == [m.version]
    for name in referenced_objects(m) & existing:
        assert storage.exists(ref.url(name)), name
    superseded = {c.object for c in old.parts} - {c.object for c in m.curation.parts}
    assert superseded and superseded <= set(report.deleted)
    assert old.report.object in report.deleted


def test_a_concurrent_writer_refuses_the_curation_and_nothing_is_half_visible(curated, monkeypatch):
    ref = BankRef(curated.url)
    stale = curate_run.read_current(ref)
    remove_segments(curated.url, Removal(segment_ids=(int(curated.ids[0]),), reason="first"))
    monkeypatch.setattr(curate_run, "read_current", lambda r: stale)
    with pytest.raises(ConcurrentUpdateError, match="CURRENT moved from v000002 to v000003"):
        curate_bank(curated.url, CurationConfig(outlier_z=2.5))
    assert list_versions(ref) == ["v000001", "v000002", "v000003"]
    assert not os.path.exists(ref.url("versions", "v000004"))
