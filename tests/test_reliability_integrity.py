"""Damaged parts are refused when read, naming the object; a storage outage is not called damage.

A part's data pages carry CRC32s checked as they are decoded, its footer's sha256 is in the manifest, and a
whole-object read checks the part's sha256: a flipped byte anywhere either raises IndexCorruptError (a
BankFormatError) naming the part, or lands in bytes no reader uses — never different data.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pytest

from bank_builder.format import BankFormatError, BankRef, IndexCorruptError, StorageError, parts, read_manifest
from bank_builder.format.parts import VISUAL
from query.bank import METADATA_COLUMNS, open_bank
from tests.index_helpers import make_bank

pytestmark = pytest.mark.reliability

ROWS = 128  # rows per row group here: parts of 300 / 200 rows span 3 / 2 row groups


@pytest.fixture
def bank(tmp_path, monkeypatch):
    """(ref, the part entry of ordinal 0, its file, its clean bytes) of a fresh local two-part bank."""
    monkeypatch.setattr(parts, "ROW_GROUP_SIZE", ROWS)
    url = str(tmp_path / "bank")
    make_bank(url, part_rows=(300, 200), dim=16, text_dim=8, n_clusters=4, n_labels=5)
    ref = BankRef(url)
    entry = read_manifest(ref).part_by_ordinal[0]
    path = os.path.join(url, "parts", f"{entry.name}.parquet")
    with open(path, "rb") as f:
        return ref, entry, path, f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _flip(data: bytes, position: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def _read_everything(ref: BankRef, entry) -> pa.Table:
    """Every column of every row group, the way readers read: footer checked, pages verified."""
    with parts.open_part(ref, entry) as f:
        return pa.concat_tables([f.read_row_group(g) for g in range(f.num_row_groups)])


def test_a_flipped_byte_in_a_data_page_is_refused_by_every_reader(bank):
    ref, entry, path, clean = bank
    footer = parts.read_footer(ref, entry)
    chunk = next(footer.row_group(1).column(i) for i in range(footer.num_columns)
                 if footer.row_group(1).column(i).path_in_schema.startswith(VISUAL))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    _write(path, _flip(clean, start + chunk.total_compressed_size // 2))
    url = parts.part_url(ref, entry.name)
    in_group_1 = [parts.segment_id(0, r) for r in (130, 200)]
    opened = open_bank(ref.uri)
    with pytest.raises(IndexCorruptError, match=f"{url} is damaged"):
        opened.visual_embeddings(in_group_1)  # the service's reads (one request per row group)
    assert len(opened.metadata(in_group_1)) == 2  # the other columns of that row group are whole
    with pytest.raises(IndexCorruptError, match=f"{url} is damaged"):
        list(parts.iter_row_groups(ref, entry.name, [VISUAL]))  # the index build's reads (by name)
    with pytest.raises(IndexCorruptError, match=f"{url} does not match the sha256"):
        parts.read_part(ref, entry)  # a whole-object read
    assert isinstance(IndexCorruptError("x"), BankFormatError)


def test_a_flipped_byte_in_the_footer_is_refused(bank):
    ref, entry, path, clean = bank
    footer_bytes = int.from_bytes(clean[-8:-4], "little")
    _write(path, _flip(clean, len(clean) - 8 - footer_bytes // 2, 3))
    with pytest.raises(IndexCorruptError, match="the footer of .* does not match the sha256"):
        parts.read_footer(ref, entry)
    with pytest.raises(IndexCorruptError, match=entry.name):
        open_bank(ref.uri).metadata([parts.segment_id(0, 5)])


def test_no_flipped_byte_goes_unnoticed_into_the_data(bank, record_property):
    ref, entry, path, clean = bank
    expected = _read_everything(ref, entry)
    rng, outcomes = random.Random(11), {"refused": 0, "unused byte": 0}
    for _ in range(200):  # seeded: every region of the object (pages, page headers, footer) is hit
        position = rng.randrange(len(clean))
        _write(path, _flip(clean, position, rng.randrange(8)))
        try:
            table = _read_everything(ref, entry)
        except IndexCorruptError as exc:
            assert entry.name in str(exc)
            outcomes["refused"] += 1
            continue
        assert table.equals(expected), f"a flip at byte {position} of {len(clean)} changed the data silently"
        outcomes["unused byte"] += 1  # e.g. a page header's statistics, which no reader uses
    record_property("flips", outcomes)
    assert outcomes["refused"] >= 190, outcomes


@pytest.mark.parametrize("damage", ["truncated", "missing", "empty"])
def test_a_truncated_or_missing_part_is_refused_naming_it(bank, damage):
    ref, entry, path, clean = bank
    if damage == "missing":
        os.unlink(path)
    else:
        _write(path, clean[: len(clean) // 2] if damage == "truncated" else b"")
    with pytest.raises(IndexCorruptError, match=entry.name):
        open_bank(ref.uri).metadata([parts.segment_id(0, 5)])
    with pytest.raises(IndexCorruptError, match=entry.name):
        list(parts.iter_row_groups(ref, entry.name, ["segment_id"]))


def test_a_store_that_refuses_reads_is_a_storage_error_not_damage(faulty_s3, monkeypatch):
    proxy, so, bucket = faulty_s3
    monkeypatch.setattr(parts, "ROW_GROUP_SIZE", ROWS)
    make_bank(f"s3://{bucket}/bank", part_rows=(300,), dim=16, text_dim=8, n_clusters=4, n_labels=5,
              storage_options=so)
    opened = open_bank(f"s3://{bucket}/bank", storage_options=so)
    proxy.rule("GET", "/parts/.*parquet", "denied", times=100)
    with pytest.raises(StorageError, match="403 AccessDenied") as caught:
        opened.metadata([parts.segment_id(0, 5)])
    assert not isinstance(caught.value, BankFormatError) and caught.value.operation == "read"
    proxy.reset()
    assert opened.metadata([parts.segment_id(0, 5)])[0]["segment_id"] == parts.segment_id(0, 5)


def test_parts_written_before_footer_checksums_are_still_read(bank):
    ref, entry, _, _ = bank
    entry.footer_sha256 = ""  # an older manifest entry: the footer goes unchecked, the pages still are
    table = _read_everything(ref, entry)
    assert table.num_rows == entry.rows and set(METADATA_COLUMNS) <= set(table.column_names)
    np.testing.assert_array_equal(table["segment_id"].to_numpy(), [parts.segment_id(0, r) for r in range(300)])
