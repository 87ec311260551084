"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1), a fault-injecting proxy in front of it, and a
local Ray cluster."""

from __future__ import annotations

import os
import uuid

# Before anything imports huggingface_hub or ray: weight lookups fail at once instead of after ~45 s,
# and a local Ray binds and advertises 127.0.0.1 only (by default it advertises the external address).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import logging

import pytest

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO

# The service's bank and server, built once per session for every module that queries a running service.
pytest_plugins = ["tests.service_fixtures"]


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1, alive for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """(storage_options, bucket): a fresh empty bucket on the moto server, and fsspec options for it."""
    import s3fs

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield options, bucket
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def proxy_server(s3_endpoint):
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto server (tests/fault_proxy.py)."""
    from tests.fault_proxy import FaultProxy

    proxy = FaultProxy(s3_endpoint)
    yield proxy
    proxy.close()


@pytest.fixture
def faulty_s3(proxy_server, s3):
    """(proxy, storage_options, bucket): a fresh bucket reached through the fault proxy, which injects nothing
    until the test calls `proxy.faults(rate, seed)` or `proxy.rule(...)`; it counts every request either way."""
    options, bucket = s3
    proxy_server.reset()
    yield proxy_server, {**options, "endpoint_url": proxy_server.url}, bucket
    proxy_server.reset()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, shared by the tests that need one."""
    import ray

    from bank_builder.ray_runtime import init_ray

    # the build's own local start (address="local": a new cluster of our own), with its system options
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
