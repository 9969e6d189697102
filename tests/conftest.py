"""Shared test fixtures: the shared reference fixtures and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KMAX_SHARED_DIR", REPO.parent / "shared"))
TEST_ARTIFACTS = REPO / "test-artifacts"


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
    from pipeline.ray_utils import RayConfig, init_ray

    ray = init_ray(RayConfig(num_cpus=4, object_store_gb=1.5))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep files worth looking at after the run (screenshots, reports)."""
    TEST_ARTIFACTS.mkdir(exist_ok=True)
    return TEST_ARTIFACTS
