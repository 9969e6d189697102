"""Shared test fixtures: the shared reference fixtures and one Ray instance per test session."""

from __future__ import annotations

import atexit
import os
import secrets
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KMAX_SHARED_DIR", REPO.parent / "shared"))
TEST_ARTIFACTS = REPO / "test-artifacts"


def _session_ray_token() -> Path:
    """One Ray token for every Ray of the test session (the local session instance, the separate-node
    clusters of tests/cluster_nodes.py, the `kmax` subprocesses), in a 0600 file named by
    RAY_AUTH_TOKEN_PATH: one of Ray's standard places, as a cluster's secret would be put on each machine.
    A user's own token variables are dropped so that the suite neither uses nor writes ~/.ray/auth_token,
    and no RAY_AUTH_MODE is set: `kmax` must find the mode itself (pipeline.ray_setup.choose_auth_mode)."""
    fd, name = tempfile.mkstemp(prefix="kmax-test-ray-token-")
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    atexit.register(os.unlink, name)
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        os.environ.pop(key, None)
    os.environ["RAY_AUTH_TOKEN_PATH"] = name
    return Path(name)


RAY_TOKEN_FILE = _session_ray_token()


def shared_path(*parts: str) -> Path:
    """A path under ../shared/, skipping the test with the reason when it is absent (a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared fixture {path} is absent (it sits beside the checkout in CI only)")
    return path


@pytest.fixture(scope="session")
def coco_sample_dir() -> Path:
    return shared_path("fixtures", "coco_panoptic_sample")


@pytest.fixture(scope="session")
def pq_oracle_dir() -> Path:
    return shared_path("fixtures", "pq_oracle")


@pytest.fixture(scope="session")
def checkpoint_keys_dir() -> Path:
    return shared_path("fixtures", "checkpoint_keys")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (4 logical CPUs on the 2-core CI machine so
    that nested Train + Data tasks are never starved), shut down at the end."""
    from pipeline.ray_setup import RayConfig, init_ray

    ray = init_ray(RayConfig(num_cpus=4, object_store_gb=1.5))
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _free_leftover_placement_groups(request):
    """After a test on the shared Ray instance, remove any placement group still alive.

    A Tune or Train run interrupted by a failing test can leave its placement groups reserving every
    logical CPU; every later Ray test would then wait forever for a CPU (seen: `ray.data.from_arrow`'s
    metadata task blocked). Removing them (which also ends the actors in them) keeps one failed test from
    hanging the rest of the session.
    """
    yield
    if "ray_session" not in request.fixturenames:
        return
    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    if not ray.is_initialized():
        return
    alive = [pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"]
    for pg in alive:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg))))
    if alive:
        message = f"{request.node.nodeid} left {len(alive)} placement group(s) alive; removed them"
        warnings.warn(message, stacklevel=1)
        deadline = time.monotonic() + 30.0  # the removal returns the CPUs asynchronously
        total = ray.cluster_resources().get("CPU", 0.0)
        while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep files worth looking at after the run (screenshots, reports)."""
    TEST_ARTIFACTS.mkdir(exist_ok=True)
    return TEST_ARTIFACTS


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("single_torch_thread")``):
    on the shared 2-core CI machine, OpenMP worker threads spin-wait against the other test processes and a
    step becomes 10-100x slower; small ops gain nothing from threads. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
