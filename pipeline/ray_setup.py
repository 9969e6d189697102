"""Starting or joining Ray quietly and authenticated, the same way for every command and test.

Ray's defaults are loud (progress bars, per-worker print patching). The environment variables below must be
set before `ray.init` so they reach every worker process (DataContext settings made in the driver do not
reach datasets built inside Tune trials; see shared/docs/reference_ray_mlflow.md §7).

Authentication (`choose_auth_mode`): Ray's token authentication stays on wherever it is on. Ray 2.60 turns
it on for a new local instance when ``RAY_AUTH_MODE`` is unset (with a banner), but when a driver joins a
cluster at an explicit address it never does, even with the cluster's token at hand
(``ray/_private/worker.py``: only ``address in (None, "auto")`` calls
``maybe_enable_token_auth_if_token_available``), so ``kmax train --set ray.address=HOST:6379`` failed
against a ``RAY_AUTH_MODE=token`` cluster after 20 s of retries. Here the mode is made explicit (which is
also what silences the banner): ``token`` for a local instance and for a cluster whose token is in one of
Ray's standard places; a cluster that then refuses the client is reported in one line (`RayJoinError`).
The user's own ``RAY_AUTH_MODE`` is always kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

QUIET_ENV = {
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

AUTH_MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR, TOKEN_PATH_VAR = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
"""Ray's own places for a cluster's token, in its order of precedence (docs.ray.io, ray-security/token-auth:
"What token does Ray use?")."""
TOKEN_PLACES = f"{TOKEN_VAR}, a file named by {TOKEN_PATH_VAR}, or {DEFAULT_TOKEN_FILE}"


class RayJoinError(ConnectionError):
    """The Ray cluster refused this client; the message is one line saying where the token goes."""


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
    choose_auth_mode(cfg.address)
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
        check_cluster_admits(cfg.address)
        ray.init(address=cfg.address, logging_level=level, log_to_driver=cfg.verbose)
    _quiet_ray_data()
    return ray


def token_available() -> bool:
    """Whether a Ray token is in one of Ray's standard places (`TOKEN_PLACES`)."""
    if os.environ.get(TOKEN_VAR):
        return True
    path = os.environ.get(TOKEN_PATH_VAR) or DEFAULT_TOKEN_FILE.expanduser()
    return Path(path).is_file()


def use_token_auth() -> None:
    """Token authentication for this process and the processes it starts (a local instance's raylet and
    workers inherit it). RayConfig caches the mode once Ray is imported, hence the re-initialisation (what
    Ray's own ``_enable_token_auth`` does)."""
    from ray._raylet import Config

    os.environ[AUTH_MODE_VAR] = "token"
    Config.initialize("")


def choose_auth_mode(address: str | None) -> None:
    """Make Ray's authentication mode explicit unless the user set it: ``token`` for a new local instance
    (Ray's own default there, which then creates ``~/.ray/auth_token`` if absent) and for a cluster whose
    token is at hand. With no token, joining a cluster leaves the mode unset: an open cluster admits the
    client (and Ray warns that it is open), one with authentication refuses it (`check_cluster_admits`)."""
    if os.environ.get(AUTH_MODE_VAR):
        return
    if address in (None, "local") or token_available():
        use_token_auth()


def check_cluster_admits(address: str) -> None:
    """Raise `RayJoinError` in one line when the cluster at ``address`` refuses this client's token (or its
    lack of one), within a second instead of ray.init's 20 s of retries and traceback, or when nothing
    answers there. A Ray Client address (``ray://``) is left to Ray."""
    if address.startswith("ray://"):
        return
    from ray._private.services import canonicalize_bootstrap_address_or_die
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError, RpcError

    gcs_address = canonicalize_bootstrap_address_or_die(address)
    try:
        with _stderr_silenced():  # the GCS client logs each failed attempt from C++ on fd 2
            GcsClient(address=gcs_address)
    except RpcError as exc:  # nothing answers there (Ray's own connection timeout, about 40 s here)
        reason = str(exc).rstrip(".")
        raise RayJoinError(f"no Ray cluster answers at {address} ({reason}); is the cluster up?") from None
    except AuthenticationError:
        raise RayJoinError(
            f"the Ray cluster at {address} refused this client ({_token_held()}): it runs with token "
            "authentication; "
            f"put the cluster's token (`ray get-auth-token` on its head) in {TOKEN_PLACES}"
        ) from None


def _token_held() -> str:
    """What this client offered the cluster, for `check_cluster_admits`' message."""
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode == "token":
        return "the token found here is not the cluster's"
    return f"{AUTH_MODE_VAR}={mode} here" if mode else "no token was found here"


@contextmanager
def _stderr_silenced():
    """File descriptor 2 pointed at /dev/null for the block (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Deterministic row order: shards, evaluation reductions and training epochs depend on it.
    ctx.execution_options.preserve_order = True
