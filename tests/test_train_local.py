"""End-to-end training with one Ray Train worker: checkpoints, MLflow content, exact resume, refusal."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import checkpoint as ckpt
from pipeline.data.records import read_manifest
from pipeline.train.driver import fit
from pipeline.train.resume import IncompatibleCheckpointError, checkpoint_names, newest_valid_checkpoint
from tests import fault_hooks
from tests.train_helpers import TINY_STEPS, make_data, metric_steps, model_weights, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """The reference: TINY_STEPS steps without interruption."""
    run_dir = tmp_path_factory.mktemp("straight")
    return fit(tiny_config(data_dir, run_dir))


def test_training_writes_checkpoints_and_mlflow(straight, data_dir):
    assert straight.steps == TINY_STEPS
    state = ckpt.load_checkpoint(straight.checkpoint)
    assert state["step"] == TINY_STEPS and state["mlflow_run_id"] == straight.mlflow_run_id
    manifest = read_manifest(data_dir, "train")
    assert manifest["num_classes"] != 8  # differs from the tiny preset's default ...
    assert state["config"]["model"]["num_classes"] == manifest["num_classes"]  # ... and comes from the data
    assert state["config"]["data"]["thing_class_ids"] == manifest["thing_class_ids"]
    assert set(state["rng"]) == {"torch", "numpy", "python"}
    # num_to_keep=1: only the latest Ray checkpoint remains; the best-PQ copy is kept beside it
    assert checkpoint_names(straight.run_dir) == [f"checkpoint_{TINY_STEPS:07d}"]
    assert straight.best_checkpoint is not None

    client = MlflowClient(straight.tracking_uri)
    run = client.get_run(straight.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(TINY_STEPS)
    assert run.data.params["model.decoder.num_clusters"] == "32"
    uri, run_id = straight.tracking_uri, straight.mlflow_run_id
    for key in (
        "train/loss",
        "train/loss_pq_dice",
        "train/loss_pq_dice_aux0",  # per-layer terms: every log_interval (1 here) steps
        "train/lr",
        "train/images_per_s",
        "train/data_wait_fraction",
    ):
        assert [s for s, _ in metric_steps(uri, run_id, key)] == [1, 2, 3, 4]
    losses = metric_steps(straight.tracking_uri, straight.mlflow_run_id, "train/loss")
    assert all(math.isfinite(v) and v > 0 for _, v in losses)
    pq = metric_steps(straight.tracking_uri, straight.mlflow_run_id, "eval/pq_all")
    assert [s for s, _ in pq] == [2, 4] and all(0 <= v <= 100 for _, v in pq)
    assert [s for s, _ in metric_steps(straight.tracking_uri, straight.mlflow_run_id, "eval/miou")] == [2, 4]
    paths = {a.path for a in client.list_artifacts(straight.mlflow_run_id)}
    paths |= {a.path for a in client.list_artifacts(straight.mlflow_run_id, "figures")}
    assert {"config.json", "checkpoints.json", "figures/clusters_step0000004.png"} <= paths
    assert "figures/predictions_step0000002.png" in paths
    local = client.download_artifacts(straight.mlflow_run_id, "config.json")
    with open(local) as f:
        assert json.load(f)["train"]["steps"] == TINY_STEPS
    with open(client.download_artifacts(run_id, "figures/clusters_step0000004.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_resume_after_stop_gives_the_same_weights(straight, data_dir, tmp_path):
    """N/2 steps, the job dies (max_failures=0), `fit` again on the same run dir resumes to N."""
    run_dir = tmp_path / "resumed"
    marker = tmp_path / "killed"
    cfg = tiny_config(data_dir, run_dir)
    fault_hooks.by_value()
    with pytest.raises(Exception, match="[Ww]orker|[Tt]raining failed") as err:
        fit(cfg, hooks=[fault_hooks.KillWorker(step=3, rank=0, marker=str(marker), delay_s=4.0)])
    assert marker.exists(), str(err.value)[:3000]
    assert newest_valid_checkpoint(str(run_dir), print)[0]["step"] == 2
    resumed = fit(cfg)
    assert resumed.steps == TINY_STEPS and resumed.mlflow_run_id  # same run id recorded in the run dir
    progress = [json.loads(x) for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert [p["step"] for p in progress if "eval" not in p and "done" not in p] == [1, 2, 3, 3, 4]  # 3 redone
    assert [p["step"] for p in progress if "eval" in p] == [2, 4]
    assert [p["step"] for p in progress if "done" in p] == [4]
    a, b = model_weights(straight.checkpoint), model_weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:  # same seeds, same data order, same RNG per step: equal up to float reduction order
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # one MLflow run with contiguous, non-duplicated steps
    steps = [s for s, _ in metric_steps(resumed.tracking_uri, resumed.mlflow_run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]
    client = MlflowClient(resumed.tracking_uri)
    assert len(client.search_runs([client.get_run(resumed.mlflow_run_id).info.experiment_id])) == 1


def test_incompatible_config_is_refused(straight, data_dir):
    cfg = tiny_config(data_dir, straight.run_dir, "model.decoder.num_clusters=16", "train.lr=0.5")
    expected = "model.decoder.num_clusters: checkpoint=32 now=16"
    with pytest.raises(IncompatibleCheckpointError, match=expected):
        fit(cfg)


def test_validation_metrics_equal_kmax_evaluate_of_the_checkpoint(straight, data_dir, tmp_path):
    """One evaluation path: what training validation logged at the last step equals, field for field, what
    `kmax evaluate --checkpoint` (Ray tasks over the shards) reports for that step's checkpoint."""
    from pipeline.cli import main

    out = tmp_path / "eval.json"
    args = ["evaluate", "--checkpoint", str(straight.checkpoint), "--data", str(data_dir)]
    assert main([*args, "--split", "val", "--out", str(out)]) == 0
    reported = json.loads(out.read_text())["metrics"]
    run = MlflowClient(straight.tracking_uri).get_run(straight.mlflow_run_id)
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    assert {"eval/pq_all", "eval/pq_things", "eval/miou", "eval/ap", "eval/ap50"} <= set(logged)
    assert reported == logged  # the latest value of each key is the final step's
    for key in logged:
        assert [s for s, _ in metric_steps(straight.tracking_uri, straight.mlflow_run_id, key)][
            -1
        ] == TINY_STEPS
    wrong = main(["evaluate", "--checkpoint", str(tmp_path / "missing"), "--data", str(data_dir)])
    assert wrong != 0


def test_input_resolution_mask_loss_trains_through_ray(straight, data_dir, tmp_path):
    """loss.mask_loss_at=input (half the points hard-mined): the worker's collate builds input_index
    targets, and the per-step loss of the same seed differs from the grid loss's (the dice and mask-ID terms
    are other quantities)."""
    cfg = tiny_config(
        data_dir,
        tmp_path / "input_loss",
        "model.loss.mask_loss_at=input",
        "model.loss.mask_loss_points=256",
        "model.loss.mask_loss_hard_ratio=0.5",
        "train.steps=2",
    )
    result = fit(cfg)
    assert result.steps == 2
    at_input = dict(metric_steps(result.tracking_uri, result.mlflow_run_id, "train/loss_pq_dice"))
    on_grid = dict(metric_steps(straight.tracking_uri, straight.mlflow_run_id, "train/loss_pq_dice"))
    assert set(at_input) == {1, 2} and all(math.isfinite(v) for v in at_input.values())
    assert at_input[1] != pytest.approx(on_grid[1], rel=1e-4)
