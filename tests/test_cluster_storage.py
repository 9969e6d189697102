"""Training on a cluster whose worker node does not share the head's disk (tests/cluster_nodes.py): the
layout of cluster.yaml (the head's CPU is not enough for the training workers, so every one of them runs
on the other machine), driven as a user drives it: `kmax` processes on the head.

* without storage: `kmax train` refuses in one line, before any compute;
* with a shared mount path as storage: a 2-worker run finishes, survives the worker node's processes being
  SIGKILLed (resumed from the checkpoint in storage on the restarted node), and leaves one MLflow run with
  every step once;
* the same with an S3-compatible object store on 127.0.0.1 (moto) as storage, the prepared split read
  from it too;
* the cluster's tracking server (`kmax tracking-server`: MLflow's basic-auth app, metadata and users in a
  real PostgreSQL server, artifacts in the S3 bucket) refuses a request without a login (401), and a wrong
  password stops `kmax sweep` and `kmax train` in one line before any trial or Ray starts;
* a sweep of 2 trials on this cluster, interrupted once its first trial is done and its second has its run,
  outlives the head: the tracking server, the whole Ray cluster and the server's files (and the driver's
  local sweep directory) go; a new server on the same database (another address) shows every run, param
  and metric step as before, `kmax sweep --resume` on a new cluster runs only the unfinished trial under
  the same parent run, nothing is duplicated, and `kmax dashboard` opens on the new server.

The run directory lies under the worker node's private parent: the driver's files there (embedded MLflow
store, progress lines) exist only on the head, as on a real cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster_nodes import (
    REPO,
    MlflowServer,
    PostgresServer,
    S3Server,
    TwoNodeCluster,
    node_env,
    require_namespaces,
    require_postgres,
)
from tests.train_helpers import make_data

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 30
KILL_AFTER_STEP = 12
"""The worker node dies once the driver has seen this step (after the checkpoint at step 10)."""
RUN_TIMEOUT_S = 420
TRAIN_FLAGS = [
    "--config", "tiny", "--num-workers", "2",
    "--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=1", "--set", "train.eval_interval=20",
    "--set", "train.checkpoint_interval=5", "--set", "train.log_interval=1", "--set", "train.num_to_keep=2",
    "--set", "data.batch_size=2", "--set", "data.eval_batch_size=2", "--set", "data.num_vis_images=1",
    "--set", "data.augment.crop_size=49", "--set", "scaling.cpus_per_worker=1",
    "--set", "scaling.placement_strategy=STRICT_PACK", "--set", "fault.max_failures=3",
]  # fmt: skip
"""2 workers x 1 CPU packed on one node: only the 2-CPU worker node holds them (the head has 1 CPU)."""
FAST_NODE_DEATH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
"""The head's GCS notices a dead node in ~3 s instead of ~15 s (Ray's defaults): the same events, sooner."""


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """One S3 server and one two-node cluster for the module (the nodes get the S3 settings, as machines
    with the bucket's endpoint configured): (root, cluster, s3)."""
    require_namespaces()
    root = tmp_path_factory.mktemp("cluster_storage")
    s3 = S3Server(root / "s3").start()
    cluster = TwoNodeCluster(root / "private", root / "nodes", env={**s3.env, **FAST_NODE_DEATH})
    try:
        cluster.start()
        yield root, cluster, s3
    finally:
        cluster.stop()
        s3.stop()


@dataclass
class Tracking:
    """The cluster's tracking database and its current server (a test that replaces the head replaces
    `server`; the fixture stops whichever is current)."""

    postgres: PostgresServer
    server: MlflowServer
    admin: tuple[str, str]

    def new_server(self, root: Path, s3: S3Server) -> MlflowServer:
        """A tracking server as the head starts it: basic-auth, metadata and users in the database,
        artifacts in the bucket (no file of the server's own outlives its head)."""
        return MlflowServer(
            root, backend=self.postgres.uri, auth=self.admin, artifacts=s3.uri("mlartifacts"), env=s3.env
        ).start()


@pytest.fixture(scope="module")
def tracking(services):
    """PostgreSQL off every node and the cluster's tracking server on it (`kmax tracking-server`)."""
    require_postgres()
    root, _, s3 = services
    postgres = PostgresServer(root / "postgres").start()
    admin = ("admin", secrets.token_urlsafe(18))  # this module's throwaway admin password
    state = Tracking(postgres, None, admin)  # type: ignore[arg-type]
    try:
        state.server = state.new_server(root / "head-1" / "mlflow", s3)
        yield state
    finally:
        if state.server is not None:
            state.server.stop()
        postgres.remove()


@pytest.fixture(scope="module")
def shared_data(services, ray_session):
    """The tiny synthetic dataset on the shared disk (outside the private parent)."""
    root = services[0]
    return make_data(root / "shared" / "synth")


def _kmax(
    argv: list[str], env: dict[str, str], timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, env=node_env(env), capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


def _train_with_node_kill(cluster: TwoNodeCluster, argv: list[str], env: dict, progress: Path) -> dict:
    """`kmax train` in the background; once the driver printed KILL_AFTER_STEP, SIGKILL the worker node and
    start it again; returns {"rc", "out", "timeline": [(seconds, event)]}."""
    t0 = time.monotonic()
    timeline = [(0.0, "kmax train started")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", *argv], cwd=REPO, env=node_env(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        while _last_step(progress) < KILL_AFTER_STEP:
            assert proc.poll() is None, f"kmax train ended early:\n{proc.stdout.read()[-4000:]}"
            assert time.monotonic() - t0 < RUN_TIMEOUT_S, "no progress"
            time.sleep(0.5)
        timeline.append((time.monotonic() - t0, f"step {_last_step(progress)} seen; worker node SIGKILLed"))
        cluster.kill_worker_node()
        timeline.append((time.monotonic() - t0, "worker node declared dead by the head"))
        cluster.start_worker_node()
        timeline.append((time.monotonic() - t0, "worker node started again (fresh private disk)"))
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        timeline.append((time.monotonic() - t0, f"kmax train exited {proc.returncode}"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"rc": proc.returncode, "out": out, "timeline": timeline}


def _last_step(progress: Path) -> int:
    if not progress.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in progress.read_text().splitlines() if line.strip()]
    return max([s for s in steps if isinstance(s, int)], default=0)


def _resumed_from_a_checkpoint(run_dir: Path, location: str) -> None:
    """The run went on from a checkpoint (10 or 15: the one at 15 may not have been registered when the node
    died; when it was, no step is repeated), not from step 1, after a pause of the node's death."""
    from pipeline.train.journal import read_rows

    records = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    drops = [b for a, b in zip(steps, steps[1:]) if b <= a]
    assert (
        steps.count(1) == 1 and drops in ([], [11], [16]) and sorted(set(steps)) == list(range(1, STEPS + 1))
    )
    times = [r["time_ms"] for r in read_rows(location) if r["group"] == "train"]
    assert max(b - a for a, b in zip(times, times[1:])) > 10_000  # the restart (death noticed in ~15 s)


def _one_run_every_step_once(run_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kmax-train")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))  # every step, once


def test_without_storage_a_cluster_run_is_refused_in_one_line(services, shared_data):
    _, cluster, _ = services
    run_dir = services[0] / "private" / "refused"
    argv = ["train", *TRAIN_FLAGS, "--data", str(shared_data), "--run-dir", str(run_dir)]
    t0 = time.monotonic()
    done = _kmax([*argv, "--set", f"ray.address={cluster.address}"], {})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    err = done.stderr.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("kmax train: this Ray cluster has 2 nodes")
        and "--storage" in err[0]
    )
    assert not (run_dir / "progress.jsonl").exists() and time.monotonic() - t0 < 60


@pytest.mark.parametrize("kind", ["shared-mount", "s3"])
def test_a_run_with_storage_survives_the_worker_node_dying(services, shared_data, kind, capsys, monkeypatch):
    from pipeline import storage as store
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.train.resume import checkpoint_names

    root, cluster, s3 = services
    run_dir = root / "private" / f"run-{kind}"
    env = dict(s3.env) if kind == "s3" else {}
    for key, value in env.items():  # this process writes and reads the bucket too
        monkeypatch.setenv(key, value)
    data, storage = str(shared_data), str(root / "shared" / "storage")
    if kind == "s3":  # the prepared split is read from the bucket too (prepared here, on the session Ray)
        data, storage = s3.uri("prepared"), s3.uri("runs")
        for split in ("train", "val"):
            raw = str(shared_data.parent / "raw")
            prepare(PrepareOptions(dataset="coco", root=raw, split=split, out=data, progress=False))
    argv = [*TRAIN_FLAGS, "--data", data, "--run-dir", str(run_dir), "--storage", storage,
            "--set", f"ray.address={cluster.address}"]  # fmt: skip
    result = _train_with_node_kill(cluster, argv, env, run_dir / "progress.jsonl")
    with capsys.disabled():
        print(f"\n{kind} storage timeline:", *(f"  {t:6.1f} s  {e}" for t, e in result["timeline"]), sep="\n")
    assert result["rc"] == 0, result["out"][-6000:]
    assert f"done: {STEPS} steps" in result["out"]
    location = store.join(storage, run_dir.name)
    _resumed_from_a_checkpoint(run_dir, location)
    _one_run_every_step_once(run_dir)
    assert checkpoint_names(location)[0] == f"checkpoint_{STEPS:07d}"
    assert store.is_file(store.join(location, "best", "state.pt"))
    assert store.list_names(store.join(location, "journal"))  # the metrics journal lives in storage too


SWEEP_STUDY = "coord_conv"
SWEEP_KEYS = ["coord_conv=False__seed0", "coord_conv=True__seed0"]
SWEEP_FLAGS = [
    "--study", SWEEP_STUDY, "--seeds", "1",
    "--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "train.eval_interval=2",
    "--set", "train.checkpoint_interval=2", "--set", "train.log_interval=1",
    "--set", "data.batch_size=2", "--set", "data.eval_batch_size=2",
    "--set", "data.num_vis_images=1", "--set", "data.augment.crop_size=49",
    "--set", "scaling.num_workers=1", "--set", "scaling.cpus_per_worker=1",
]  # fmt: skip
"""2 trials of 4 steps; one at a time (a trial needs 2.25 of the cluster's 3 CPUs)."""
REFUSAL_S = 30.0
"""A refused login ends `kmax` within this (Python and MLflow imports on a loaded 2-core machine; the
refusal itself is one request). Before the probe logged in, a wrong password cost 20 s of MLflow's
retries and a 40-line traceback."""


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_tracking_server_refuses_requests_without_a_valid_login(services, shared_data, tracking, capsys):
    """401 without a login; with a wrong password `kmax sweep` (on the cluster) and `kmax train` exit 2 in
    one line naming the credential variables, before Ray or any trial starts: nothing in storage, no run."""
    import base64

    root, cluster, _ = services
    uri, (admin, password) = tracking.server.uri, tracking.admin
    search = uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    basic = "Basic " + base64.b64encode(f"{admin}:{password}".encode()).decode()
    codes = {"no login": _status(search), "right login": _status(search, {"Authorization": basic})}
    wrong = {"MLFLOW_TRACKING_USERNAME": admin, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    storage, sweep_dir = root / "shared" / "refused-storage", root / "private" / "refused-sweep"
    commands = {
        "kmax sweep": ["sweep", *SWEEP_FLAGS, "--data", str(shared_data), "--run-dir", str(sweep_dir),
                       "--storage", str(storage), "--tracking-uri", uri, "--ray-address", cluster.address],
        "kmax train": ["train", *TRAIN_FLAGS, "--data", str(shared_data), "--run-dir", str(sweep_dir),
                       "--storage", str(storage), "--tracking-uri", uri,
                       "--set", f"ray.address={cluster.address}"],
    }  # fmt: skip
    refusals = {}
    for name, argv in commands.items():
        t0 = time.monotonic()
        done = _kmax(argv, wrong, timeout=120)
        refusals[name] = (done.returncode, done.stderr.strip().splitlines(), time.monotonic() - t0)
    with capsys.disabled():
        print(f"\ntracking server {uri}: GET experiments/search without a login -> HTTP {codes['no login']}, "
              f"with the admin's -> HTTP {codes['right login']}")  # fmt: skip
        for name, (rc, err, seconds) in refusals.items():
            print(
                f"{name} with a wrong password: exit {rc} after {seconds:.1f} s, {len(err)} stderr line(s):"
            )
            print("  " + "\n  ".join(err))
    assert codes == {"no login": 401, "right login": 200}
    for name, (rc, err, seconds) in refusals.items():
        assert rc == 2 and len(err) == 1 and seconds < REFUSAL_S, (name, rc, err, seconds)
        assert err[0] == (
            f"{name}: MLflow server {uri} refused user {admin} (HTTP 401): check MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    assert not storage.exists() and not sweep_dir.exists()  # nothing started, nothing written


def _snapshot(uri: str, login: dict[str, str], monkeypatch) -> dict[str, dict]:
    """Every run of the sweep's experiment in the store behind `uri`, by run id: name, status, parent,
    params, and every metric's (step, value) history in step order."""
    from mlflow.tracking import MlflowClient

    for key, value in login.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"sweep-{SWEEP_STUDY}")
    runs = {}
    for run in client.search_runs([experiment.experiment_id]):
        history = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
        }
        runs[run.info.run_id] = {
            "name": run.info.run_name, "status": run.info.status, "params": run.data.params,
            "trial": run.data.tags.get("trial"), "parent": run.data.tags.get("mlflow.parentRunId"),
            "metrics": history,
        }  # fmt: skip
    return runs


def _figures(runs: dict[str, dict]) -> str:
    """Totals, then per run (the parent first): params, metric steps, status."""
    params = sum(len(r["params"]) for r in runs.values())
    steps = sum(len(h) for r in runs.values() for h in r["metrics"].values())
    each = [
        f"{r['trial'] or 'parent ' + r['name']}: {len(r['params'])} params, "
        f"{sum(len(h) for h in r['metrics'].values())} steps, {r['status']}"
        for r in sorted(runs.values(), key=lambda r: r["trial"] or "")
    ]
    return f"{len(runs)} runs, {params} params, {steps} metric steps ({'; '.join(each)})"


def _sweep_until_one_trial_done(argv: list[str], env: dict, trials: Path, log: Path) -> list[tuple]:
    """`kmax sweep` in the background; SIGKILL its process group once one trial is done and the other has
    its MLflow run (recorded in storage: the resume must find that run, not make another). Returns the
    timeline [(seconds, event)]."""
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "sweep", *argv], cwd=REPO, env=node_env(env),
            stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
    try:
        while True:
            done = [k for k in SWEEP_KEYS if (trials / k / "trial_done.json").exists()]
            started = [k for k in SWEEP_KEYS if (trials / k / "mlflow_run.json").exists()]
            if len(done) == 1 and len(started) == 2:
                break
            assert len(done) < 2, "both trials finished before the sweep could be interrupted"
            assert proc.poll() is None, f"kmax sweep ended early:\n{log.read_text()[-5000:]}"
            assert time.monotonic() - t0 < RUN_TIMEOUT_S, f"no trial done:\n{log.read_text()[-5000:]}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return [(time.monotonic() - t0, f"{done[0]} done, the other's MLflow run made: kmax sweep SIGKILLed")]


def _head_goes(cluster: TwoNodeCluster, tracking: Tracking, sweep_dir: Path) -> None:
    """The head is lost, at once: its tracking server and the whole Ray cluster SIGKILLed (as machines that
    lose power), the server's files and the driver's local sweep directory deleted."""
    tracking.server.kill()
    cluster.stop(kill=True)
    shutil.rmtree(tracking.server.root)
    shutil.rmtree(sweep_dir, ignore_errors=True)


def test_a_sweep_outlives_the_head_its_tracking_server_and_its_cluster(
    services, shared_data, tracking, capsys, monkeypatch
):
    """Trials run where Tune puts them (either node) and log to the authenticated server with the
    driver's credentials (the nodes have none); their data, checkpoints and done records are in storage,
    their metadata in PostgreSQL; see the module docstring for the head's loss and the resume."""
    from pipeline import storage as store

    root, cluster, s3 = services
    storage, sweep_dir = root / "shared" / "storage", root / "private" / "sweep"
    trials, login = storage / "sweep" / "trials", tracking.server.client_env

    def argv(uri: str) -> list[str]:
        return [*SWEEP_FLAGS, "--data", str(shared_data), "--run-dir", str(sweep_dir), "--storage",
                str(storage), "--tracking-uri", uri, "--ray-address", cluster.address]  # fmt: skip

    t0 = time.monotonic()
    timeline = _sweep_until_one_trial_done(argv(tracking.server.uri), login, trials, root / "sweep-1.log")
    (kept,) = [k for k in SWEEP_KEYS if store.is_file(str(trials / k / "trial_done.json"))]
    before = _snapshot(tracking.server.uri, login, monkeypatch)
    _head_goes(cluster, tracking, sweep_dir)
    timeline.append((time.monotonic() - t0, "tracking server, Ray cluster and the head's files gone"))
    tracking.server = tracking.new_server(root / "head-2" / "mlflow", s3)
    cluster.start()
    timeline.append((time.monotonic() - t0, f"new head: server at {tracking.server.uri}, new Ray cluster"))
    after_loss = _snapshot(tracking.server.uri, login, monkeypatch)
    resumed = _kmax(["sweep", *argv(tracking.server.uri), "--resume"], login)
    timeline.append((time.monotonic() - t0, f"kmax sweep --resume exited {resumed.returncode}"))
    final = _snapshot(tracking.server.uri, login, monkeypatch)
    dashboard = _kmax(
        ["dashboard", "--tracking-uri", tracking.server.uri, "--sweep", SWEEP_STUDY], login, 120
    )
    with capsys.disabled():
        print("\nsweep across the head's loss:", *(f"  {t:6.1f} s  {e}" for t, e in timeline), sep="\n")
        print(
            f"  before the head's loss: {_figures(before)}\n  on the new server:     {_figures(after_loss)}"
        )
        print(
            *(f"  --resume: {line}" for line in resumed.stdout.splitlines() if "trial(s)" in line), sep="\n"
        )
        print(f"  after --resume:        {_figures(final)}\n  kmax dashboard: {dashboard.stdout.strip()}")
    assert after_loss == before  # every run, param and metric step, as the old server had them
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-3000:]
    assert f"resume: 1 finished trial(s) kept: {kept}" in resumed.stdout
    assert "sweep coord_conv: 1 trial(s) run (0 stopped early), 1 kept, 0 failed" in resumed.stdout
    _same_parent_nothing_duplicated(before, final, kept)
    _dashboard_opens_on_the_sweep(dashboard, tracking.server.uri)


def _same_parent_nothing_duplicated(before: dict, final: dict, kept: str) -> None:
    """The runs are the same ones (the parent and both children, by id), the kept trial's run untouched,
    the resumed trial's finished with each metric step once."""
    assert set(final) == set(before) and len(final) == 3
    (parent,) = [i for i, r in final.items() if r["parent"] is None]
    children = {r["trial"]: r for r in final.values() if r["parent"] == parent}
    assert sorted(children) == SWEEP_KEYS and final[parent]["status"] == "FINISHED"
    kept_id = next(i for i, r in final.items() if r["trial"] == kept)
    assert final[kept_id] == before[kept_id]
    for run in children.values():
        assert run["status"] == "FINISHED" and "eval/pq_all" in run["metrics"]
        for key, history in run["metrics"].items():
            steps = [step for step, _ in history]
            assert len(steps) == len(set(steps)), (run["trial"], key, steps)  # no step twice
        assert [s for s, _ in run["metrics"]["train/loss"]] == [1, 2, 3, 4]


def _dashboard_opens_on_the_sweep(done: subprocess.CompletedProcess, uri: str) -> None:
    """`kmax dashboard --tracking-uri <server>` saves the sweep's view there and prints its URL on that
    server (no second server: the tracking server serves the UI behind its login)."""
    from mlflow.tracking import MlflowClient

    from pipeline.sweep.sweep_view import SHARED_VIEW_TAG_PREFIX

    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith(f"MLflow dashboard: {uri}/#/experiments/") and "viewStateShareKey=" in first
    key = first.rsplit("viewStateShareKey=", 1)[1]
    tags = MlflowClient(uri).get_experiment_by_name(f"sweep-{SWEEP_STUDY}").tags
    assert SHARED_VIEW_TAG_PREFIX + key in tags
