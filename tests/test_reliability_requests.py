"""Metadata reads on S3 cost at most one storage request per cache miss, counted at the proxy in front of moto."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bank_builder.format import parts
from query.bank import open_bank
from tests.index_helpers import make_bank

pytestmark = pytest.mark.reliability

ROWS = 128  # rows per row group: parts of 300 / 200 rows span 3 / 2 row groups


def _ids(*where: tuple[int, int]) -> list[int]:
    return [parts.segment_id(o, r) for o, r in where]


def test_each_cache_miss_costs_one_request_and_a_hit_none(faulty_s3, tmp_path, monkeypatch):
    proxy, so, bucket = faulty_s3
    monkeypatch.setattr(parts, "ROW_GROUP_SIZE", ROWS)
    for url, options in ((f"s3://{bucket}/bank", so), (str(tmp_path / "local"), {})):
        make_bank(url, part_rows=(300, 200), dim=16, text_dim=8, n_clusters=4, n_labels=5, storage_options=options)
    bank, local = open_bank(f"s3://{bucket}/bank", storage_options=so), open_bank(str(tmp_path / "local"))

    def requests(call) -> tuple[object, list[str]]:
        before = len(proxy.requests)
        out = call()
        return out, [r.method for r in proxy.requests[before:]]

    ids = _ids((0, 5), (0, 290), (1, 130), (0, 7))  # part 0: row groups 0 and 2; part 1: row group 1
    meta, sent = requests(lambda: bank.metadata(ids))
    assert meta == local.metadata(ids) and sent == ["GET"] * 5  # two footers, three row groups
    assert requests(lambda: bank.metadata(ids))[1] == []  # all cached
    assert requests(lambda: bank.metadata(_ids((0, 200))))[1] == ["GET"]  # one new row group
    vectors, sent = requests(lambda: bank.visual_embeddings(ids))  # other columns: other cache entries
    np.testing.assert_array_equal(vectors, local.visual_embeddings(ids))
    assert sent == ["GET"] * 3
    labels, sent = requests(lambda: bank.labels(ids + [-1]))
    assert labels == local.labels(ids + [-1]) and sent == ["GET"] * 5  # each part's label column, once
    assert requests(lambda: bank.labels(_ids((1, 199), (0, 0))))[1] == []
    stats = bank.stats()
    assert (stats["footers_read"], stats["row_groups_read"], stats["label_parts_loaded"]) == (2, 7, 2)
    assert stats["row_group_hits"] == 3 and stats["row_group_cache_bytes"] > 0

    fresh = _ids((1, 10), (1, 20))  # part 1, row group 0: never read
    results, errors = [], []

    def lookup() -> None:
        try:
            results.append(bank.metadata(fresh))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    before = len(proxy.requests)
    threads = [threading.Thread(target=lookup) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r == local.metadata(fresh) for r in results) and len(results) == 8
    assert len(proxy.requests) - before == 1  # eight concurrent misses of one row group: one fetch


def test_the_row_group_cache_stays_under_its_budget(faulty_s3, monkeypatch):
    proxy, so, bucket = faulty_s3
    monkeypatch.setattr(parts, "ROW_GROUP_SIZE", ROWS)
    make_bank(f"s3://{bucket}/bank", part_rows=(300, 200), dim=16, text_dim=8, n_clusters=4, n_labels=5,
              storage_options=so)
    unbounded = open_bank(f"s3://{bucket}/bank", storage_options=so)
    unbounded.metadata(_ids((0, 0)))
    one_group = unbounded.stats()["row_group_cache_bytes"]  # a full row group: the largest
    bank = open_bank(f"s3://{bucket}/bank", storage_options=so, cache_bytes=one_group)
    everything = _ids(*((o, r) for o, n in ((0, 300), (1, 200)) for r in range(0, n, ROWS)))
    for _ in range(2):
        assert [m["segment_id"] for m in bank.metadata(everything)] == everything
        assert bank.stats()["row_group_cache_bytes"] <= one_group
    assert bank.stats()["row_groups_read"] == 10  # five row groups, read twice: the budget keeps one at a time
