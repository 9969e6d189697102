"""MLflow tracking of training runs through an explicit `MlflowClient` (never the fluent global state).

Embedded default: a SQLite store ``<run_dir>/mlflow.db`` and the artifact folder ``<run_dir>/mlartifacts``.
Any tracking URI can be given instead (an MLflow server ``http://host:port``, another database); a
server is probed before any compute is spent, and an unreachable one is a clear error. A server behind
MLflow's login (the cluster's, pipeline.tracking_server) is logged into with MLflow's standard
credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or ~/.mlflow/credentials); the probe
logs in too, so refused credentials are one line before any compute, not MLflow's retries and traceback.

Why a client and explicit ids: ``mlflow.set_tracking_uri`` / ``set_experiment`` export
``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_ID`` into ``os.environ``, which Ray workers inherit
(shared/docs/reference_ray_mlflow.md §3). Only the driver talks to the store: it creates or resumes the
run, and sends what the training workers report (pipeline.train.forwarder), so a worker on another node
never needs to reach it.

Resumed runs stay contiguous: `RunLogger` reads, per metric key, the last step already in the store and
drops re-logged values at or below it. A run resumed from a checkpoint at step ``c`` recomputes steps
``c+1..``; those already logged before the failure are skipped, the rest are logged once.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_FILE = "mlflow.db"
"""The embedded SQLite store's file in a run directory."""

RUN_ID_FILE = "mlflow_run.json"
"""Written into the run directory: {"tracking_uri", "experiment_id", "run_id"}; a rerun resumes that run."""

MAX_PARAM_VALUE = 6000
"""MLflow's limit on a param value's length."""

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
"""Marks an experiment as model training: MLflow 3's UI then shows runs and charts, not a GenAI app."""

PARAM_BATCH = 100
METRIC_BATCH = 1000
SERVER_PROBE_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable directory)."""


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: tracking URI and artifact location of new experiments (None: server default)."""

    tracking_uri: str
    artifact_location: str | None


def resolve_target(tracking_uri: str | None, run_dir: str | Path) -> TrackingTarget:
    """The embedded SQLite store in ``run_dir`` when ``tracking_uri`` is empty, else the given URI."""
    run_dir = Path(run_dir).resolve()
    if not tracking_uri:
        run_dir.mkdir(parents=True, exist_ok=True)
        return TrackingTarget(f"sqlite:///{run_dir / STORE_FILE}", (run_dir / "mlartifacts").as_uri())
    return TrackingTarget(tracking_uri, None)


def existing_store(tracking_uri: str | None, run_dir: str | Path) -> str:
    """The tracking URI to read from: ``tracking_uri``, else the embedded store of ``run_dir``, which must
    exist (FileNotFoundError naming it: a reader must not create an empty store)."""
    store = Path(run_dir) / STORE_FILE
    if not tracking_uri and not store.is_file():
        raise FileNotFoundError(
            f"no tracking store at {store}; run `kmax sweep` (or `kmax demo`) first, or pass --run-dir / "
            "--tracking-uri"
        )
    return resolve_target(tracking_uri, run_dir).tracking_uri


CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
"""MLflow's standard client credentials (basic auth; MLflow also reads them from ~/.mlflow/credentials)."""
TOKEN_VARIABLE = "MLFLOW_TRACKING_TOKEN"
AUTH_PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
"""A read every user of a basic-auth server may make (MLflow's default permission is READ); /health
answers without credentials, so it cannot tell a refused login."""


def credential_env() -> dict[str, str]:
    """The MLflow client credentials of this process, as environment variables: what a process on another
    node (a sweep's trial) must be given to log as this user. Ray workers there do not inherit the
    driver's environment, and ~/.mlflow/credentials is this machine's file."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    found = dict(zip(CREDENTIAL_VARIABLES, (creds.username, creds.password)))
    found[TOKEN_VARIABLE] = os.environ.get(TOKEN_VARIABLE)
    return {k: v for k, v in found.items() if v}


def _auth_header(env: dict[str, str]) -> dict[str, str]:
    user, password = (env.get(k) for k in CREDENTIAL_VARIABLES)
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if env.get(TOKEN_VARIABLE):
        return {"Authorization": f"Bearer {env[TOKEN_VARIABLE]}"}
    return {}


def _check_login(tracking_uri: str, timeout_s: float) -> None:
    """TrackingError (one line naming the credential variables) when the server refuses this process's
    credentials (HTTP 401 or 403) on an authenticated read."""
    env = credential_env()
    request = urllib.request.Request(tracking_uri.rstrip("/") + AUTH_PROBE_PATH, headers=_auth_header(env))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return  # not a login problem: the client reports it where it happens
        if not _auth_header(env):
            raise TrackingError(
                f"MLflow server {tracking_uri} requires a login (HTTP {exc.code}): set "
                f"{' and '.join(CREDENTIAL_VARIABLES)} to a user of that server"
            ) from None
        user = env.get(CREDENTIAL_VARIABLES[0], "the token's user")
        raise TrackingError(
            f"MLflow server {tracking_uri} refused user {user} (HTTP {exc.code}): check "
            f"{' and '.join(CREDENTIAL_VARIABLES)} (or {TOKEN_VARIABLE})"
        ) from None


def check_tracking_uri(tracking_uri: str, timeout_s: float = SERVER_PROBE_TIMEOUT_S) -> None:
    """Fail fast: probe an http(s) server's ``/health``, then log in to it with this process's MLflow
    credentials (`CREDENTIAL_VARIABLES`); check a SQLite file's directory is writable."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(
                        f"MLflow server {tracking_uri} answered HTTP {resp.status} on /health"
                    )
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {tracking_uri} is unreachable ({exc}); start it or pass another "
                "--tracking-uri (leave it out for the embedded SQLite store in the run directory)"
            ) from exc
        _check_login(tracking_uri, timeout_s)
    elif tracking_uri.startswith("sqlite:///"):
        parent = Path(tracking_uri[len("sqlite:///") :]).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow store directory {parent}: {exc}") from exc


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _run_exists(client, run_id: str) -> bool:
    """Whether the store holds ``run_id``; any other failure (unreachable, refused) propagates, so that
    it can never be mistaken for a missing run and duplicated."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def get_or_create_experiment(target: TrackingTarget, name: str) -> str:
    client = _client(target.tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs = {"artifact_location": f"{target.artifact_location}/{name}"} if target.artifact_location else {}
    return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}, **kwargs)


def read_run_record(location: str | Path) -> dict[str, str]:
    """The ``location/mlflow_run.json`` record of a run or sweep (`RUN_ID_FILE`): tracking_uri,
    experiment_id, run_id. FileNotFoundError when the run was never started."""
    from pipeline import storage

    return json.loads(storage.read_text(storage.join(str(location), RUN_ID_FILE)))


def start_or_resume_run(
    target: TrackingTarget,
    experiment_name: str,
    location: str | Path,
    run_name: str,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """The MLflow run of the run at ``location`` (a path or a storage URI, pipeline.storage): the one
    recorded in ``location/mlflow_run.json`` when it exists in this store (resumed; marked RUNNING again),
    else a new run recorded there. Returns (run_id, resumed).

    The run is looked up by its id, not by the recorded URI: a store outlives the address it was reached
    at (a cluster's database-backed server on a replaced head answers at the new head's address), and a
    run id (a random UUID) found in a store is that run. The record then gets the new URI. A recorded URI
    equal to this one whose store lacks the run is a TrackingError (the store was replaced or emptied)."""
    from pipeline import storage

    client = _client(target.tracking_uri)
    record = storage.join(str(location), RUN_ID_FILE)
    if storage.is_file(record):
        saved = read_run_record(location)
        same_uri = saved.get("tracking_uri") == target.tracking_uri
        if _run_exists(client, saved["run_id"]):
            client.update_run(saved["run_id"], status="RUNNING")
            if not same_uri:
                moved = {**saved, "tracking_uri": target.tracking_uri}
                storage.write_text(record, json.dumps(moved, indent=1))
            return saved["run_id"], True
        if same_uri:
            raise TrackingError(
                f"{record} names MLflow run {saved['run_id']}, which is not in {target.tracking_uri}"
            )
    exp_id = get_or_create_experiment(target, experiment_name)
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
    saved = {"tracking_uri": target.tracking_uri, "experiment_id": exp_id, "run_id": run.info.run_id}
    storage.write_text(record, json.dumps(saved, indent=1))
    return run.info.run_id, False


def flat_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"model.decoder.num_clusters": 8, ...}: the dotted view that MLflow params and
    the resume check (pipeline.train.resume) share; lists and tuples are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_dict(v, key + "."))
        else:
            out[key] = v
    return out


def flatten_params(d: Mapping[str, Any]) -> dict[str, str]:
    """Nested config dict -> {"model.decoder.num_clusters": "8", ...} (values as strings, truncated)."""
    return {
        k: (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:MAX_PARAM_VALUE]
        for k, v in flat_dict(d).items()
    }


class RunLogger:
    """Logs to one existing MLflow run; metric steps at or below what the store already holds are skipped
    so that a resumed run has no duplicated step (see module docstring)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = _client(tracking_uri)
        self._stored_keys = set(self.client.get_run(self.run_id).data.metrics)
        self._last_step: dict[str, int] = {}

    def _last_logged(self, key: str) -> int:
        """The last step of ``key`` in the store (-1: none), read on the key's first use only: a run has
        several loggers (the training loop's eval logger, its step-metrics writer), each reads its keys."""
        if key not in self._last_step:
            history = self.client.get_metric_history(self.run_id, key) if key in self._stored_keys else []
            self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]

    def has_params(self) -> bool:
        return bool(self.client.get_run(self.run_id).data.params)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> int:
        """Log finite metrics at ``step``; returns how many were written (0 when all were already stored)."""
        return self.log_metric_rows([(metrics, step, None)])

    def log_metric_rows(self, rows: list[tuple[Mapping[str, float], int, int | None]]) -> int:
        """Log several steps' metrics, ``(metrics, step, timestamp_ms or None = now)`` each, in as few
        store writes as possible; same skipping rules as `log_metrics`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for metrics, step, timestamp_ms in rows:
            for k, v in metrics.items():
                v = float(v)
                if not math.isfinite(v) or step <= self._last_logged(k):
                    continue
                items.append(Metric(k, v, now if timestamp_ms is None else timestamp_ms, int(step)))
                self._last_step[k] = int(step)
        for i in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + METRIC_BATCH])
        return len(items)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
