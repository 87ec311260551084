"""The bank's lease: one writer at a time on stores without conditional writes.

On local disks and on S3 stores that honour conditional writes, publishing is a compare-and-swap on CURRENT
(versions.py) and needs no lock. A store without them (an S3-compatible endpoint that ignores If-None-Match /
If-Match — `storage.conditional_writes` probes for that — or another fsspec store) cannot make a check and a
write one step, so a writer publishes while holding `<bank>/LEASE`: a JSON object naming its holder and when
it expires.

Taking it: wait while another holder's lease is live (not expired), write our own, wait `settle_s`, and read it
back — a writer whose read-back shows someone else's lease lost the race (the later write wins) and waits
again. Before it moves CURRENT the holder checks that the lease is still its own and live. What this cannot
exclude, unlike a compare-and-swap: a holder that stalls for more than `settle_s` between that last check and
its write of CURRENT while another writer takes an expired or contested lease. Publishing holds the lease for
a few storage calls, far below `ttl_s`; a lease left by a crashed writer stops counting at its expiry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bank_builder.format import storage
from bank_builder.format.errors import ConcurrentUpdateError
from bank_builder.format.ref import BankRef

log = logging.getLogger("refbank.format")

LEASE_OBJECT = "LEASE"


@dataclass(frozen=True)
class LeaseConfig:
    """How the lease is held: ttl_s its lifetime, settle_s the pause before the read-back that decides who holds
    it, wait_s how long to wait for another holder before giving up, poll_s how often to look meanwhile."""

    ttl_s: float = 60.0
    settle_s: float = 2.0
    wait_s: float = 300.0
    poll_s: float = 1.0


@dataclass(frozen=True)
class Lease:
    """A lease this process holds on a bank."""

    ref: BankRef
    token: str
    expires_at: float

    def check(self) -> None:
        """ConcurrentUpdateError unless the lease is still ours and live (call it right before moving CURRENT)."""
        held = _read(self.ref)
        if held is None or held.get("token") != self.token or time.time() >= self.expires_at:
            raise ConcurrentUpdateError(
                f"bank {self.ref}: this writer's lease ({self.ref.url(LEASE_OBJECT)}) expired or was taken by "
                f"{_holder(held)}; nothing was published. Run the same command again")


@contextmanager
def hold_lease(ref: BankRef, config: LeaseConfig = LeaseConfig()) -> Iterator[Lease]:
    """Hold the bank's lease for the block; released (deleted) after it. ConcurrentUpdateError when another
    writer keeps it longer than `config.wait_s`."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + config.wait_s
    while True:
        held = _read(ref)
        if held is not None and held.get("token") != token and float(held.get("expires_at", 0)) > time.time():
            if time.monotonic() > deadline:
                raise ConcurrentUpdateError(
                    f"bank {ref}: another writer ({_holder(held)}) has held its lease for over "
                    f"{config.wait_s:.0f} s; run the command again once it is done (or delete "
                    f"{ref.url(LEASE_OBJECT)} if that writer is gone: it expires by itself at "
                    f"{time.strftime('%H:%M:%S', time.gmtime(float(held['expires_at'])))} UTC)")
            time.sleep(config.poll_s)
            continue
        expires_at = time.time() + config.ttl_s
        body = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "expires_at": expires_at}
        storage.write_bytes(ref.url(LEASE_OBJECT), json.dumps(body).encode(), ref.storage_options)
        time.sleep(config.settle_s)
        held = _read(ref)
        if held is not None and held.get("token") == token:
            break
        log.info("bank %s: lost the lease to %s; waiting", ref, _holder(held))
    try:
        yield Lease(ref, token, expires_at)
    finally:
        _release(ref, token)


def _read(ref: BankRef) -> dict | None:
    """The lease object's content, or None when there is none (or it is not a lease: treated as absent)."""
    try:
        held = json.loads(storage.read_bytes(ref.url(LEASE_OBJECT), ref.storage_options))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn or foreign object cannot hold the bank
    return held if isinstance(held, dict) else None


def _release(ref: BankRef, token: str) -> None:
    """Delete the lease if it is still ours; a failure leaves it to expire."""
    try:
        held = _read(ref)
        if held is not None and held.get("token") == token:
            storage.remove_tree(ref.url(LEASE_OBJECT), ref.storage_options)
    except Exception as exc:  # noqa: BLE001 - the publish is done; an unreleased lease only expires
        log.warning("bank %s: could not release the lease (%s); it expires by itself", ref, exc)


def _holder(held: dict | None) -> str:
    return "nobody" if held is None else f"pid {held.get('pid')} on {held.get('host')}"
