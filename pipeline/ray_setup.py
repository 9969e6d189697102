"""Starting or joining Ray quietly, the same way for every command and test.

Ray's defaults are loud (token-auth banners, progress bars, per-worker print patching). The
environment variables below must be set before `ray.init` so they reach every worker process
(DataContext settings made in the driver do not reach datasets built inside Tune trials; see
shared/docs/reference_ray_mlflow.md §7).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass

QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "1",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # read at mlflow's import: no "Creating initial database" INFO lines
}
"""Set (unless the user already set them) by the kmax command line and before Ray starts; inherited by
all workers."""

MALLOC_MMAP_THRESHOLD = 64 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD),
}
"""glibc malloc settings for the worker processes of a local instance (read when a process starts). A fresh
process maps and page-faults every multi-MB numpy temporary anew until glibc's adaptive threshold rises;
with a fixed 64 MiB threshold those come from the reused heap (freed memory above 256 MiB goes back to the
OS). Measured: the per-record conversion of `kmax prepare` (512x1024) took 23 ms in a fresh process and
19 ms with these settings. pipeline.eval.pq_files sets the same two values in its worker processes."""

DATA_CPU_RESERVE = 1.0
"""Logical CPUs a training run keeps free for its Ray Data read tasks: with every CPU taken by Train
workers, Ray Data never schedules and the run hangs (shared/docs/reference_ray_mlflow.md §4)."""

MLFLOW_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
"""Variables MLflow exports into os.environ; they must not leak into Ray workers."""


@dataclass
class RayConfig:
    """How to reach Ray.

    Attributes:
        address: ``None`` or ``"local"`` starts a private local instance; anything else (``"auto"``,
            ``"ray://host:10001"``, ``"host:6379"``) joins that cluster.
        num_cpus: logical CPUs of a local instance (``None``: all cores).
        object_store_gb: object-store cap of a local instance, in GiB.
        verbose: keep Ray's own INFO logs and worker output.
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_gb: float = 2.0
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus must be >= 1, got {self.num_cpus}")
        if self.object_store_gb <= 0:
            raise ValueError(f"ray.object_store_gb must be > 0, got {self.object_store_gb}")


def run_cpu_need(num_workers: int, cpus_per_worker: float, driver_cpus: float = 0.0) -> float:
    """Logical CPUs one training run needs at once: its Train workers, `DATA_CPU_RESERVE` for the Ray Data
    tasks that feed them and, for a sweep trial, ``driver_cpus`` for its Tune driver."""
    return driver_cpus + num_workers * cpus_per_worker + DATA_CPU_RESERVE


def with_local_cpus(cfg: RayConfig, need: float) -> RayConfig:
    """A local Ray started with at least ``need`` logical CPUs (all cores otherwise): a small machine is
    oversubscribed rather than a run refused. A cluster address, or CPUs the user set, are kept."""
    if cfg.address not in (None, "local") or cfg.num_cpus is not None:
        return cfg
    return dataclasses.replace(cfg, num_cpus=max(os.cpu_count() or 1, math.ceil(need)))


def quiet_environment() -> None:
    """Export `QUIET_ENV` and `ALLOCATOR_ENV` (without overriding the user's values) and drop leaked MLflow
    variables."""
    for key, value in (QUIET_ENV | ALLOCATOR_ENV).items():
        os.environ.setdefault(key, value)
    for key in MLFLOW_ENV_VARS:
        os.environ.pop(key, None)


def init_ray(cfg: RayConfig | None = None):
    """Start or join Ray once per process; a no-op when Ray is already initialised.

    Returns the ``ray`` module so callers can write ``ray = init_ray(cfg)``.
    """
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        # Already connected (a Tune trial's process, a test session): the DataContext is per process, and
        # a trial's datasets must be ordered like the driver's, or its training data order (and result)
        # would depend on scheduling.
        _quiet_ray_data()
        return ray
    quiet_environment()
    level = logging.INFO if cfg.verbose else logging.ERROR
    if cfg.address in (None, "local"):
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=int(cfg.object_store_gb * 1024**3),
            logging_level=level,
            log_to_driver=cfg.verbose,
            # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner polls to free the
            # placement group of a run whose controller died (a Tune trial stopped by ASHA); without it
            # the group leaks and later trials wait forever (reference_ray_mlflow.md, top note).
            include_dashboard=True,
            configure_logging=True,
        )
    else:
        ray.init(address=cfg.address, logging_level=level, log_to_driver=cfg.verbose)
    _quiet_ray_data()
    return ray


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Deterministic row order: shards, evaluation reductions and training epochs depend on it.
    ctx.execution_options.preserve_order = True
