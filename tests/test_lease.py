"""Publishing on stores without conditional writes: the probe that finds them, and the bank's lease."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from bank_builder.format import (
    BankRef, ConcurrentUpdateError, PartEntry, current_version, list_versions, make_manifest, publish, read_current,
    read_manifest, storage,
)
from bank_builder.format.lease import LEASE_OBJECT, LeaseConfig

FAST = LeaseConfig(ttl_s=30.0, settle_s=0.3, wait_s=20.0, poll_s=0.05)
SPEC = {"visual_dim": 5, "text_dim": None}


def _manifest(*names: str):
    parts = [PartEntry(n, i, f"file:///x/{n}.tar", 0, 0, "", 0, 0, {}, "fp") for i, n in enumerate(names)]
    return make_manifest(parts, SPEC, "fp", {})


@pytest.fixture
def ignoring_s3(faulty_s3):
    """A bank on an S3 endpoint that applies conditional PUTs as plain ones (the proxy drops the conditions)."""
    proxy, options, bucket = faulty_s3
    proxy.ignore_conditions()
    return BankRef(f"s3://{bucket}/banks/b", options)


@pytest.fixture
def memory_bank():
    """A bank on fsspec's in-memory store, which has no conditional writes at all."""
    return BankRef(f"memory://refbank-test-{uuid.uuid4().hex}/bank")


def test_the_probe_finds_an_s3_endpoint_that_ignores_conditional_writes(s3, ignoring_s3):
    options, bucket = s3
    assert storage.conditional_writes(f"s3://{bucket}/banks/b", options)  # moto honours them
    assert not storage.conditional_writes(ignoring_s3.uri, ignoring_s3.storage_options)
    # What the probe guards against: behind such an endpoint a "create if absent" overwrites.
    url = ignoring_s3.url("x")
    storage.write_if_absent(url, b"first", ignoring_s3.storage_options)
    storage.write_if_absent(url, b"second", ignoring_s3.storage_options)
    assert storage.read_bytes(url, ignoring_s3.storage_options) == b"second"
    assert not storage.exists(ignoring_s3.url(".refbank-probe"), ignoring_s3.storage_options)


@pytest.mark.parametrize("store", ["ignoring_s3", "memory_bank"])
def test_concurrent_writers_on_a_store_without_conditional_writes_never_both_publish(store, request):
    ref = request.getfixturevalue(store)
    publish(ref, _manifest("a"), read_current(ref), FAST)
    for round_ in range(3):
        stale = read_current(ref)  # both writers planned from the same CURRENT
        start, outcomes = threading.Barrier(2), {}

        def writer(name: str) -> None:
            start.wait()
            try:
                outcomes[name] = publish(ref, _manifest("a", name), stale, FAST)
            except ConcurrentUpdateError as exc:
                outcomes[name] = exc

        threads = [threading.Thread(target=writer, args=(f"w{round_}-{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        won = {n: v for n, v in outcomes.items() if isinstance(v, str)}
        lost = {n: v for n, v in outcomes.items() if isinstance(v, ConcurrentUpdateError)}
        assert len(won) == 1 and len(lost) == 1, outcomes
        (winner, version), = won.items()
        assert "CURRENT moved" in str(next(iter(lost.values())))
        # The live version is the winner's, whole; the loser left no visible version behind.
        assert current_version(ref) == version
        assert [p.name for p in read_manifest(ref).parts] == ["a", winner]
        assert list_versions(ref)[-1] == version and read_manifest(ref).parent == stale.version
    assert not storage.exists(ref.url(LEASE_OBJECT), ref.storage_options)  # released after each publish


def test_a_live_lease_of_another_writer_is_waited_for_then_refused(memory_bank):
    ref = memory_bank
    publish(ref, _manifest("a"), read_current(ref), FAST)
    other = {"token": "other", "host": "elsewhere", "pid": 7, "expires_at": time.time() + 60}
    storage.write_bytes(ref.url(LEASE_OBJECT), json.dumps(other).encode(), ref.storage_options)
    with pytest.raises(ConcurrentUpdateError, match="pid 7 on elsewhere"):
        publish(ref, _manifest("a", "b"), read_current(ref), LeaseConfig(settle_s=0.1, wait_s=0.5, poll_s=0.1))
    assert current_version(ref) == "v000001"


def test_an_expired_lease_of_a_crashed_writer_does_not_block(memory_bank):
    ref = memory_bank
    publish(ref, _manifest("a"), read_current(ref), FAST)
    crashed = {"token": "crashed", "host": "gone", "pid": 1, "expires_at": time.time() - 1}
    storage.write_bytes(ref.url(LEASE_OBJECT), json.dumps(crashed).encode(), ref.storage_options)
    assert publish(ref, _manifest("a", "b"), read_current(ref), FAST) == "v000002"


def test_a_writer_whose_lease_was_taken_publishes_nothing(memory_bank, monkeypatch):
    """A holder that stalled past its lease while another writer took it must not move CURRENT."""
    from bank_builder.format import lease as lease_module

    ref = memory_bank
    publish(ref, _manifest("a"), read_current(ref), FAST)
    real_check = lease_module.Lease.check

    def taken_meanwhile(self):
        thief = {"token": "thief", "host": "h", "pid": 2, "expires_at": time.time() + 60}
        storage.write_bytes(ref.url(LEASE_OBJECT), json.dumps(thief).encode(), ref.storage_options)
        real_check(self)

    monkeypatch.setattr(lease_module.Lease, "check", taken_meanwhile)
    with pytest.raises(ConcurrentUpdateError, match="expired or was taken by pid 2"):
        publish(ref, _manifest("a", "b"), read_current(ref), FAST)
    assert current_version(ref) == "v000001" and list_versions(ref) == ["v000001"]
    assert not storage.exists(ref.url("versions", "v000002", "manifest.json"), ref.storage_options)
