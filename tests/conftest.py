import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# Lanes: `-m "not slow"` runs the pure tests (no Ray, no subprocess merges) in well under a minute.
# A test is slow when it uses a Ray fixture, lives in tests/cluster, or is marked slow itself; the guard below
# fails a test left in the fast lane that starts Ray anyway, so the lanes cannot drift.
SLOW_FIXTURES = {"local_ray", "cluster", "ray_head", "killed", "baseline", "fake_gpu_ray"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts Ray, a cluster, Slurm or a merge subprocess (the slow lane)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords:
            continue
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or f"{os.sep}cluster{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_lane_guard(request):
    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if before or "slow" in request.node.keywords or "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test started Ray but is not in the slow lane: mark it @pytest.mark.slow")


@pytest.fixture(scope="session")
def pair_factory(tmp_path_factory):
    """The one way tests get a synthetic SFT / aligned pair: pair_factory(kind="tiny", *, private=False,
    **make_pair_overrides) -> (sft_dir, aligned_dir), and pair_factory.bin(folder, shard_tensors=None). Pairs are
    generated once per session and shared read-only; private=True gives a test its own copy to change (tests/pairs.py)."""
    from pairs import PairFactory

    factory = PairFactory(tmp_path_factory)
    yield factory
    factory.check_all()


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray per test module (start-up costs seconds here)."""
    from clusters import embedded_ray

    with embedded_ray(num_cpus=4) as ray:
        yield ray


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py), one per test module that asks for it."""
    from s3server import weed_server

    with weed_server(str(tmp_path_factory.mktemp("weed"))) as server:
        yield server
