"""Training on a cluster whose worker node does not share the head's disk (tests/cluster_nodes.py): the
layout of cluster.yaml (the head's CPU is not enough for the training workers, so every one of them runs
on the other machine), driven as a user drives it: `kmax` processes on the head.

* without storage: `kmax train` refuses in one line, before any compute;
* with a shared mount path as storage: a 2-worker run finishes, survives the worker node's processes being
  SIGKILLed (resumed from the checkpoint in storage on the restarted node), and leaves one MLflow run with
  every step once;
* the same with an S3-compatible object store on 127.0.0.1 (moto) as storage, the prepared split read
  from it too;
* a sweep of 2 trials on this cluster with storage and an MLflow server.

The run directory lies under the worker node's private parent: the driver's files there (embedded MLflow
store, progress lines) exist only on the head, as on a real cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster_nodes import (
    REPO,
    MlflowServer,
    S3Server,
    TwoNodeCluster,
    node_env,
    require_namespaces,
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
    """One S3 server, one MLflow server and one two-node cluster for the module (the nodes get the S3
    settings, as machines with the bucket's endpoint configured)."""
    require_namespaces()
    root = tmp_path_factory.mktemp("cluster_storage")
    s3 = S3Server(root / "s3").start()
    mlflow = MlflowServer(root / "mlflow").start()
    cluster = TwoNodeCluster(root / "private", root / "nodes", env={**s3.env, **FAST_NODE_DEATH})
    try:
        cluster.start()
        yield root, cluster, s3, mlflow
    finally:
        cluster.stop()
        mlflow.stop()
        s3.stop()


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
    _, cluster, _, _ = services
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

    root, cluster, s3, _ = services
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


def test_a_sweep_of_two_trials_on_the_cluster(services, shared_data):
    """Trials run where Tune puts them (either node): their data, checkpoints and done records are in
    storage, their metrics on the MLflow server."""
    from mlflow.tracking import MlflowClient

    from pipeline import storage as store

    root, cluster, _, mlflow = services
    storage, sweep_dir = str(root / "shared" / "storage"), str(root / "private" / "sweep")
    argv = [
        "sweep", "--study", "coord_conv", "--seeds", "1", "--data", str(shared_data), "--run-dir", sweep_dir,
        "--storage", storage, "--tracking-uri", mlflow.uri, "--ray-address", cluster.address,
        "--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "train.eval_interval=2",
        "--set", "train.checkpoint_interval=2", "--set", "data.batch_size=2",
        "--set", "data.eval_batch_size=2",
        "--set", "data.num_vis_images=1", "--set", "data.augment.crop_size=49",
        "--set", "scaling.num_workers=1", "--set", "scaling.cpus_per_worker=1",
    ]  # fmt: skip
    done = _kmax(argv, {})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert "2 trial(s) run" in done.stdout
    keys = ["coord_conv=False__seed0", "coord_conv=True__seed0"]
    for key in keys:
        assert store.is_file(store.join(storage, "sweep", "trials", key, "trial_done.json"))
    client = MlflowClient(mlflow.uri)
    experiment = client.get_experiment_by_name("sweep-coord_conv")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["trial"] for r in children) == keys
    assert all(r.info.status == "FINISHED" and "eval/pq_all" in r.data.metrics for r in runs if r in children)
