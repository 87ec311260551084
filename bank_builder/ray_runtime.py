"""Connecting to Ray: a real cluster by address, or a local one kept on loopback.

Its own module, free of heavy imports, because Ray workers import the module of every task they run:
index tasks must not drag in torch through the build pipeline.
"""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at `address`, or start a local one when `address` is None."""
    if ray.is_initialized():
        return
    if address is None:
        # A local Ray advertises the machine's external interface by default; this keeps the whole local
        # cluster on 127.0.0.1. A real cluster (an address) keeps its real addresses.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # address="local" starts a cluster of this process's own: without it Ray joins whatever cluster another
        # process started on this machine (`ray start`, another job), with its resources and its code.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address)
