"""`refbank build` and `refbank index` killed at recorded points of their storage traffic, then run again: the
bank ends up as a clean run makes it, and no half-published version is ever listed.

The kill points are requests seen by the proxy in front of the S3 server (the bank's storage), not timers:
after the first / the k-th part commit marker (or staging object) reached the store, during publish before
CURRENT moves (the new manifest is written, CURRENT not yet), and right after CURRENT moved (before the
version's published.json). The hook kills the command's whole session with SIGKILL while the request is in
flight, so the command never learns how it ended. Each case starts Ray in a subprocess: slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import s3fs

from bank_builder.format import BankRef, current_version, list_versions, storage
from bank_builder.index import IndexConfig, build_index
from bank_builder.pipeline import build_bank
from bank_builder.synthetic import CorpusConfig, make_corpus
from query.bank import open_bank
from tests.build_helpers import tiny_config
from tests.reliability_helpers import digest

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

TINY = ["--encoder", "tiny-clip", "--weights", "untrained", "--batch-size", "4", "--min-area", "32"]
INDEX = IndexConfig(autotune_queries=50, nprobe_candidates=(1, 4, 16))  # `refbank index`'s other defaults


def _session(sid: int) -> list[int]:
    """Pids of the processes in session `sid` (a command started with start_new_session and all it started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[3]) == sid:
                pids.append(int(entry))
    return pids


def _kill_session(sid: int, leader: bool = True) -> None:
    """SIGKILL every process of session `sid`, and its leader unless it has been reaped (its pid may be reused)."""
    for pid in ([sid] if leader else []) + _session(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone already


class Killer:
    """Runs a refbank command in its own session; `hook(n)` is a proxy hook that kills that session on its n-th
    call (and has the proxy reset the connection), recording which request it was."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.proc, self.killed_at = tmp, None, None
        self.calls, self.lock = 0, threading.Lock()

    def start(self, *args: str) -> None:
        exe = Path(sys.executable).with_name("refbank")
        self.log = open(self.tmp / "command.log", "w")
        self.proc = subprocess.Popen([str(exe), *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def hook(self, n: int):
        def kill(request) -> str:
            with self.lock:
                self.calls += 1
                if self.calls == n and self.killed_at is None:
                    _kill_session(self.proc.pid)
                    self.killed_at = request
            return "reset" if self.killed_at is not None else None
        return kill

    def wait(self) -> int:
        code = self.proc.wait(timeout=600)
        self.log.close()
        deadline = time.monotonic() + 10
        while _session(self.proc.pid) and time.monotonic() < deadline:
            _kill_session(self.proc.pid, leader=False)  # one its dying parent was starting as the kill landed
            time.sleep(0.1)
        assert not _session(self.proc.pid), "processes of the killed command survived"
        return code


@pytest.fixture(scope="module")
def world(s3_endpoint, tmp_path_factory):
    """A bucket (direct options), a local corpus of four shards, and the clean bank built from it on moto."""
    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    bucket = f"kills-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    root = tmp_path_factory.mktemp("kills")
    make_corpus(str(root / "corpus"), CorpusConfig(shards=4, samples_per_shard=3, image_size=96, seed=6))
    corpus = str(root / "corpus" / "train-*.tar")
    clean = f"s3://{bucket}/clean"
    assert build_bank(tiny_config(corpus, clean, options)).ok
    indexed = f"s3://{bucket}/clean-indexed"
    s3fs.S3FileSystem(**options).copy(f"{bucket}/clean", f"{bucket}/clean-indexed", recursive=True)
    build_index(indexed, INDEX, options)
    return {"options": options, "bucket": bucket, "corpus": corpus, "clean": clean, "indexed": indexed}


def _run_killed(killer: Killer, proxy, prefix: str, method: str, pattern: str, when: str, n: int,
                *command: str) -> None:
    """Run `command` with the bank behind the proxy, killed at the n-th request matching `pattern`."""
    proxy.reset()
    proxy.rule(method, f"/{prefix}{pattern}", "hook", times=10_000, hook=killer.hook(n), when=when)
    killer.start(*command, "--endpoint-url", proxy.url)
    code = killer.wait()
    assert killer.killed_at is not None, f"the command ended ({code}) before the kill point: " + \
        (killer.tmp / "command.log").read_text()[-2000:]
    assert code == -signal.SIGKILL
    proxy.reset()


# (command, kill point) → (method, path pattern under the bank, before/after the store answers, n-th such request)
POINTS = {
    ("build", "first part marker"): ("PUT", r"/parts/[^/]+\.json$", "after", 1),
    ("build", "second part marker"): ("PUT", r"/parts/[^/]+\.json$", "after", 2),
    ("index", "first staging object"): ("PUT", r"/index/[^/]+/staging/", "after", 1),
    ("index", "second staging object"): ("PUT", r"/index/[^/]+/staging/", "after", 2),
    **{(command, "publish, before CURRENT moves"): ("PUT", r"/CURRENT$", "before", 1)
       for command in ("build", "index")},
    **{(command, "publish, right after CURRENT moved"): ("PUT", r"/CURRENT$", "after", 1)
       for command in ("build", "index")},
}


@pytest.mark.parametrize("point", [point for command, point in POINTS if command == "build"])
def test_a_build_killed_at_a_recorded_point_resumes_to_the_clean_bank(world, proxy_server, tmp_path, point,
                                                                       record_property):
    options, bucket = world["options"], world["bucket"]
    name = f"build-{uuid.uuid4().hex[:6]}"
    url, ref = f"s3://{bucket}/{name}", BankRef(f"s3://{bucket}/{name}", world["options"])
    method, pattern, when, n = POINTS["build", point]
    _run_killed(Killer(tmp_path), proxy_server, f"{bucket}/{name}", method, pattern, when, n,
                "build", world["corpus"], url, *TINY)
    markers = [m for m in storage.list_names(ref.url("parts"), options) if m.endswith(".json")]
    record_property("killed", {"markers": len(markers)})
    moved = point.endswith("CURRENT moved")
    assert current_version(ref) == ("v000001" if moved else None)
    assert list_versions(ref) == (["v000001"] if moved else [])  # the orphan manifest of a kill before is unlisted
    if point.endswith("marker"):
        assert n <= len(markers) < 4, markers
    again = build_bank(tiny_config(world["corpus"], url, options))
    assert again.ok and again.parts_written == 4 - len(markers)
    # killed after CURRENT moved: the re-run is up to date and reports the version it found, publishing nothing
    assert again.version == ("v000002" if "before CURRENT" in point else "v000001")
    assert (again.published, again.up_to_date) == (not moved, moved)
    assert list_versions(ref) == [current_version(ref)]
    assert digest(url, options) == digest(world["clean"], options)


@pytest.mark.parametrize("point", [point for command, point in POINTS if command == "index"])
def test_an_index_run_killed_at_a_recorded_point_leaves_a_servable_bank_and_reruns_to_the_clean_index(
        world, proxy_server, tmp_path, point, record_property):
    options, bucket = world["options"], world["bucket"]
    name = f"index-{uuid.uuid4().hex[:6]}"
    url, ref = f"s3://{bucket}/{name}", BankRef(f"s3://{bucket}/{name}", options)
    s3fs.S3FileSystem(**options).copy(f"{bucket}/clean", f"{bucket}/{name}", recursive=True)
    method, pattern, when, n = POINTS["index", point]
    _run_killed(Killer(tmp_path), proxy_server, f"{bucket}/{name}", method, pattern, when, n, "index", url)
    moved = point.endswith("CURRENT moved")
    record_property("killed", {"staging": len(storage.glob(storage.join(ref.url("index"), "*", "staging", "*"),
                                                               options))})
    assert current_version(ref) == ("v000002" if moved else "v000001")
    assert list_versions(ref) == (["v000001", "v000002"] if moved else ["v000001"])
    opened = open_bank(url, storage_options=options)  # what `serve` opens: whole, whichever version it is
    assert (opened.index is not None) == moved
    report = build_index(url, INDEX, options)
    if moved:  # the killed run's index was published whole: the re-run finds it up to date and publishes nothing
        assert report.mode == "up_to_date" and report.version is None
        assert list_versions(ref) == ["v000001", "v000002"] and current_version(ref) == "v000002"
    else:
        assert report.version == ("v000003" if "before CURRENT" in point else "v000002")
        assert list_versions(ref)[-1] == report.version == current_version(ref)
    assert digest(url, options) == digest(world["indexed"], options)
