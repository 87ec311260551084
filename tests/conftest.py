"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1) and a local Ray cluster."""

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
def ray_local():
    """A local Ray with 2 CPUs, shared by the tests that need one."""
    import ray

    if not ray.is_initialized():
        # address="local": always a new cluster of our own, never one another process started on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
