"""Storage calls under S3 faults (the fault proxy in front of moto): retried, counted, or one named error.

Every storage call meets each fault kind once and still returns what a fault-free call returns; a call that
keeps failing raises StorageError naming the operation and the object; a refused conditional write is never
retried into a success, while a conditional write whose answer was lost is recognised as done.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bank_builder.format import BankRef, StorageError, current_version, list_versions, make_manifest, publish
from bank_builder.format import read_current, read_manifest, retries, storage
from tests.index_helpers import make_bank

pytestmark = pytest.mark.reliability

FAST = retries.RetryPolicy(attempts=3, first_backoff_s=0.001, max_backoff_s=0.002)


def _operations(url: str, so: dict) -> list[tuple[str, object]]:
    """(name, call) for every storage function, each returning a value that shows it worked."""
    data = bytes(range(256)) * 40

    def write():
        storage.write_bytes(url("w"), data, so)
        return storage.read_bytes(url("w"), so) == data

    def create():
        storage.write_if_absent(url("c"), data, so)
        return storage.read_bytes(url("c"), so) == data

    def replace():
        _, tag = storage.read_tagged(url("w"), so)
        storage.replace_if(url("w"), b"v000002\n", tag, so)
        return storage.read_tagged(url("w"), so)[0]

    return [
        ("write", write),
        ("read", lambda: storage.read_bytes(url("w"), so) == data),
        ("read_range", lambda: storage.read_range(url("w"), 1000, 3000, so) == data[1000:3000]),
        ("read_ranges", lambda: storage.read_ranges([url("w")] * 3, [0, 10, 5000], [5, 20, 6000], so)
         == [data[:5], data[10:20], data[5000:6000]]),
        ("size", lambda: storage.size(url("w"), so)),
        ("exists", lambda: (storage.exists(url("w"), so), storage.exists(url("nothing"), so))),
        ("create", create),
        ("read_tagged", lambda: storage.read_tagged(url("c"), so)[0] == data),
        ("replace", replace),
        ("list", lambda: sorted(storage.list_names(url(""), so))),
        ("glob", lambda: sorted(p.rsplit("/", 1)[-1] for p in storage.glob(url("*"), so))),
        ("remove", lambda: (storage.remove_tree(url("c"), so), storage.exists(url("c"), so))),
    ]


@pytest.mark.parametrize("kind", ["slowdown", "unavailable", "internal", "reset", "lost", "truncate"])
def test_every_storage_call_survives_a_fault(faulty_s3, monkeypatch, kind):
    proxy, so, bucket = faulty_s3
    monkeypatch.setattr(retries, "RETRY", FAST)
    clean = {name: call() for name, call in _operations(lambda n: f"s3://{bucket}/clean/{n}", so)}
    assert clean["list"] == ["c", "w"] and clean["remove"] == (None, False) and clean["exists"] == (True, False)
    before = storage.counters()
    operations = _operations(lambda n: f"s3://{bucket}/{kind}/{n}", so)
    # aiohttp sends a request again by itself when a reused keep-alive connection drops: a reset hits twice, so
    # that the second one reaches refbank's retries.
    times = 2 if kind in ("reset", "lost") else 1
    for name, call in operations:
        rule = proxy.rule("*", f"/{bucket}", kind, times=times)  # the operation's first request(s) meet the fault
        assert call() == clean[name], name
        assert rule.hits == times, name
    used = storage.counters() - before
    assert used.failed == 0 and used.recovered == used.retries and used.tries >= len(operations) + used.retries
    if kind in ("slowdown", "unavailable", "internal"):  # each error answer costs one retry (a HEAD's has no code)
        assert used.retries == used.throttled + used.server_errors >= len(operations)
        assert (used.throttled > 0) == (kind == "slowdown")
    else:  # an answer without a body cannot be cut short: a truncate there is no fault
        assert used.retries == used.connection_errors >= len(operations) // 2


def test_a_call_that_keeps_failing_raises_one_line_naming_operation_and_object(faulty_s3, monkeypatch):
    proxy, so, bucket = faulty_s3
    monkeypatch.setattr(retries, "RETRY", FAST)
    url = f"s3://{bucket}/x/object.bin"
    storage.write_bytes(url, b"data", so)
    proxy.rule("GET", "/x/object.bin", "slowdown", times=3)
    before = storage.counters()
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(url, so)
    error = caught.value
    assert (error.operation, error.url) == ("read", url) and "SlowDown" in error.cause and "3 tries" in error.cause
    assert "\n" not in str(error) and str(error).startswith(f"storage read of {url} failed: 503 SlowDown")
    used = storage.counters() - before
    assert (used.tries, used.retries, used.throttled, used.failed, used.recovered) == (3, 2, 3, 1, 0)
    assert storage.read_bytes(url, so) == b"data"  # the rule is spent: the store answers again


def test_a_permanent_error_is_not_retried(faulty_s3):
    proxy, so, bucket = faulty_s3
    url = f"s3://{bucket}/x/secret"
    storage.write_bytes(url, b"data", so)
    proxy.reset()
    proxy.rule("GET", "/x/secret", "denied")
    with pytest.raises(StorageError, match=r"storage read of s3://.*/x/secret failed: 403 AccessDenied"):
        storage.read_bytes(url, so)
    assert [r.method for r in proxy.requests] == ["GET"]


def test_a_refused_conditional_write_is_never_retried_into_a_success(faulty_s3):
    proxy, so, bucket = faulty_s3
    url = f"s3://{bucket}/x/CURRENT"
    storage.write_if_absent(url, b"v000001\n", so)
    data, tag = storage.read_tagged(url, so)
    storage.replace_if(url, b"v000002\n", tag, so)  # another writer moves it on
    proxy.reset()
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if_absent(url, b"v000003\n", so)
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_if(url, b"v000003\n", tag, so)  # the stale tag
    # One PUT each, then one GET that reads the object back (it holds another writer's bytes: a refusal).
    assert [r.method for r in proxy.requests] == ["PUT", "GET", "PUT", "GET"]
    assert storage.read_bytes(url, so) == b"v000002\n"


@pytest.mark.parametrize("kind", ["lost", "reset", "unavailable"])
def test_a_conditional_write_whose_answer_was_lost_counts_as_done(faulty_s3, kind):
    proxy, so, bucket = faulty_s3
    url = f"s3://{bucket}/x/CURRENT"
    storage.write_if_absent(url, b"v000001\n", so)
    _, tag = storage.read_tagged(url, so)
    rule = proxy.rule("PUT", "/x/CURRENT", kind)
    storage.replace_if(url, b"v000002\n", tag, so)  # "lost": moto applied it; the retry is refused, then read back
    assert rule.hits == 1 and storage.read_bytes(url, so) == b"v000002\n"
    proxy.rule("PUT", "/x/NEW", kind)
    storage.write_if_absent(f"s3://{bucket}/x/NEW", b"created", so)
    assert storage.read_bytes(f"s3://{bucket}/x/NEW", so) == b"created"


def _bank(so: dict, bucket: str) -> BankRef:
    make_bank(f"s3://{bucket}/bank", part_rows=(300, 200), dim=8, text_dim=4, n_clusters=4, n_labels=3,
              storage_options=so)
    return BankRef(f"s3://{bucket}/bank", so)


def test_a_failed_put_of_current_names_it_and_leaves_only_an_orphan(faulty_s3, monkeypatch):
    proxy, so, bucket = faulty_s3
    monkeypatch.setattr(retries, "RETRY", FAST)
    ref = _bank(so, bucket)
    m = read_manifest(ref)
    proxy.rule("PUT", "/bank/CURRENT$", "unavailable", times=3)
    with pytest.raises(StorageError) as caught:
        publish(ref, make_manifest(m.parts, m.encoder, m.fingerprint, {}), read_current(ref))
    assert caught.value.operation == "replace" and caught.value.url == ref.url("CURRENT")
    assert "503 ServiceUnavailable" in str(caught.value) and "\n" not in str(caught.value)
    assert storage.exists(ref.url("versions", "v000002", "manifest.json"), so)  # the orphan
    assert list_versions(ref) == ["v000001"] and current_version(ref) == "v000001"
    again = publish(ref, make_manifest(m.parts, m.encoder, m.fingerprint, {}), read_current(ref))
    assert again == "v000003" and list_versions(ref) == ["v000001", "v000003"]


def test_a_failed_listing_names_it(faulty_s3, monkeypatch):
    proxy, so, bucket = faulty_s3
    monkeypatch.setattr(retries, "RETRY", FAST)
    ref = _bank(so, bucket)
    proxy.rule("GET", "list-type=2", "internal", times=3)
    with pytest.raises(StorageError, match=r"storage list of s3://.*/bank/versions/\*/published.json failed: "
                                           r"500.*gave up after 3 tries"):
        list_versions(ref)


def test_a_listing_that_fails_in_part_never_drops_a_version(faulty_s3):
    proxy, so, bucket = faulty_s3
    ref = _bank(so, bucket)
    m = read_manifest(ref)
    for _ in range(3):
        publish(ref, make_manifest(m.parts, m.encoder, m.fingerprint, {}), read_current(ref))
    expected = ["v000001", "v000002", "v000003", "v000004"]
    assert list_versions(ref) == expected
    calls = iter(range(1000))
    # Every other listing request fails (fsspec's own glob lists folder by folder and drops a failed folder).
    proxy.rule("GET", "list-type=2", "hook", times=1000, hook=lambda request: "internal" if next(calls) % 2 == 0
               else None)
    for _ in range(3):
        assert list_versions(ref) == expected


def test_the_cli_answers_a_storage_failure_with_one_line(faulty_s3):
    proxy, so, bucket = faulty_s3
    _bank(so, bucket)
    proxy.rule("GET", "/bank/CURRENT$", "denied", times=10)
    exe = Path(sys.executable).with_name("refbank")
    run = subprocess.run([str(exe), "index", f"s3://{bucket}/bank", "--endpoint-url", proxy.url],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: storage read of s3://{bucket}/bank/CURRENT failed: "
                                                   "403 AccessDenied"), run.stderr
