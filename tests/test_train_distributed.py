"""Two Ray Train workers (DDP over gloo): a worker killed mid-run, distributed validation, multi-node.

Ordering: the multi-node test builds its own `ray.cluster_utils.Cluster`, which cannot share the session
Ray of this process, so it runs in a subprocess (tests/multinode_run.py) while the session Ray stays up;
the two Ray instances use different ports and never see each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline import checkpoint as ckpt
from pipeline.eval.evaluate import evaluate_prepared
from pipeline.eval.predictor import predictor_from_checkpoint
from pipeline.train.driver import fit
from tests import fault_hooks
from tests.conftest import REPO
from tests.train_helpers import TINY_STEPS, make_data, metric_steps, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LOSS_RTOL = 1e-4
"""Multi-node vs single-node loss curves: same seeds and shards, only the gloo transport differs."""


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("synth2"))


@pytest.fixture(scope="module")
def killed_run(data_dir, tmp_path_factory):
    """2 workers; rank 1 dies (os._exit) after step 3, once; max_failures=1 restarts from checkpoint 2."""
    run_dir = tmp_path_factory.mktemp("ddp")
    marker = run_dir / "killed.marker"
    cfg = tiny_config(data_dir, run_dir, "fault.max_failures=1", workers=2)
    fault_hooks.by_value()
    summary = fit(cfg, hooks=[fault_hooks.KillWorker(step=3, rank=1, marker=str(marker))])
    return summary, marker


def test_worker_killed_mid_run_is_replaced(killed_run):
    summary, marker = killed_run
    assert marker.read_text().startswith("killed rank 1 at step 3")
    assert summary.steps == TINY_STEPS
    assert ckpt.load_checkpoint(summary.checkpoint)["step"] == TINY_STEPS
    client = MlflowClient(summary.tracking_uri)
    exp_id = client.get_run(summary.mlflow_run_id).info.experiment_id
    runs = client.search_runs([exp_id])
    assert [r.info.run_id for r in runs] == [summary.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"
    for key in ("train/loss", "train/lr"):
        assert [s for s, _ in metric_steps(summary.tracking_uri, summary.mlflow_run_id, key)] == [1, 2, 3, 4]
    assert [s for s, _ in metric_steps(summary.tracking_uri, summary.mlflow_run_id, "eval/pq_all")] == [2, 4]


def test_distributed_validation_equals_single_process(killed_run, data_dir):
    """PQ gathered from 2 workers (each predicting half of the images) == one process predicting all."""
    summary, _ = killed_run
    logged = metric_steps(summary.tracking_uri, summary.mlflow_run_id, "eval/pq_all")[-1][1]
    predictor, _ = predictor_from_checkpoint(summary.checkpoint, data_dir, "val")
    single = evaluate_prepared(data_dir, "val", predictor, batch_size=3)
    assert logged == pytest.approx(100 * single["pq"]["All"]["pq"], abs=1e-9)


def test_multinode_matches_single_node(killed_run, data_dir, tmp_path):
    """2 nodes x 1 CPU (ray.cluster_utils.Cluster), one worker per node: same loss curve as single node."""
    summary, _ = killed_run
    out = tmp_path / "multinode.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "multinode_run.py"),
            str(data_dir),
            str(tmp_path / "r"),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["nodes"]) == 2  # STRICT_SPREAD over 2 nodes: one worker on each
    single = metric_steps(summary.tracking_uri, summary.mlflow_run_id, "train/loss")
    assert [s for s, _ in result["loss"]] == [s for s, _ in single] == [1, 2, 3, 4]
    for (_, multi), (_, one) in zip(result["loss"], single):
        assert multi == pytest.approx(one, rel=LOSS_RTOL)


def test_ddp_with_the_cluster_softmax_pixel_update_and_a_disabled_loss(data_dir, tmp_path):
    """2 DDP workers: cluster_softmax (its per-layer pixel update) and a loss weighted 0 (its head gets no
    gradient, so DDP must look for unused parameters) both train; either used to stop DDP at step 2."""
    cfg = tiny_config(
        data_dir,
        tmp_path / "cluster_softmax",
        "model.decoder.assignment=cluster_softmax",
        "model.loss.semantic_weight=0",
        "train.steps=2",
        "train.eval_interval=0",
        "train.checkpoint_interval=0",
        workers=2,
    )
    summary = fit(cfg)
    assert summary.steps == 2
    losses = metric_steps(summary.tracking_uri, summary.mlflow_run_id, "train/loss")
    assert [s for s, _ in losses] == [1, 2]
    assert metric_steps(summary.tracking_uri, summary.mlflow_run_id, "train/loss_semantic") == []
