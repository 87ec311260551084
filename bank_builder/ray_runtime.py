"""Connecting to Ray: a real cluster by address, or a local one kept on loopback.

Its own module, free of heavy imports, because Ray workers import the module of every task they run:
index tasks must not drag in torch through the build pipeline.
"""

from __future__ import annotations

import os

import ray

# Idle worker processes a local Ray keeps per CPU. Ray's default keeps one per CPU and kills the others after a
# second idle, but a build beside a CPU encoder runs 0.25-CPU decode and write tasks, several per CPU: each task
# that lands after such a kill pays a new worker's start (~1.5 CPU-s of imports), which was most of the build's
# decode and write CPU (docs/BENCHMARKS.md, "Build throughput").
IDLE_WORKERS_PER_CPU = 4


def local_system_config(num_cpus: int | None) -> dict[str, int]:
    """The Ray system options of a local cluster of `num_cpus` CPUs (None: this machine's)."""
    cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
    return {"num_workers_soft_limit": IDLE_WORKERS_PER_CPU * max(cpus, 1)}


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
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _system_config=local_system_config(num_cpus))
    else:
        ray.init(address=address)
