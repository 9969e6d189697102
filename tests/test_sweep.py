"""The Tune sweep: resources formula, trial keys, a real 2-trial sweep interrupted then resumed, MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.study import Study
from pipeline.sweep import DONE_FILE, PARAMETERS_METRIC, max_concurrent_trials, run_sweep, trial_key
from tests.sweep_helpers import FAILED_ONCE, KEPT, STEPS, STUDY, shared_sweep

REPO = Path(__file__).resolve().parents[1]


def test_max_concurrent_trials_formula():
    # need = 0.25 driver + 1 x 0.5 worker + 1 data = 1.75 -> floor(4 / 1.75) = 2
    assert max_concurrent_trials(4, 1, 0.5) == 2
    # 16 CPUs, 2 workers x 1 CPU: need 3.25 -> 4 trials
    assert max_concurrent_trials(16, 2, 1.0) == 4
    # exact fit counts: need 2.0 on 2 CPUs -> 1
    assert max_concurrent_trials(2, 1, 0.5, driver_cpus=0.5, data_reserve=1.0) == 1
    with pytest.raises(ValueError, match="one trial needs 2.25 CPUs"):
        max_concurrent_trials(2, 1, 1.0)


def test_trial_keys_are_deterministic_and_distinct():
    study = Study("s", {"model.decoder.blocks_per_stride": [(1, 1, 1), (2, 2, 2)]}, seeds=2)
    keys = [trial_key(t, study) for t in study.trials()]
    assert keys == [
        "blocks_per_stride=1x1x1__seed0",
        "blocks_per_stride=1x1x1__seed1",
        "blocks_per_stride=2x2x2__seed0",
        "blocks_per_stride=2x2x2__seed1",
    ]
    assert keys == [trial_key(t, study) for t in study.trials()]


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_interrupted_then_resumed_runs_only_missing_trials(ray_session, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    s = shared_sweep(tmp_path_factory)
    assert (s.first.finished, s.first.failed, s.first.skipped) == ([KEPT], [FAILED_ONCE], [])
    assert (s.resumed.finished, s.resumed.failed, s.resumed.skipped) == ([FAILED_ONCE], [], [KEPT])
    assert s.resumed.parent_run_id == s.first.parent_run_id
    # the kept trial was not re-run: its files and done record are untouched
    kept_dir = s.sweep_dir / "trials" / KEPT
    assert json.loads((kept_dir / DONE_FILE).read_text()) == s.kept_before["record"]
    now = {str(p): p.stat().st_mtime_ns for p in kept_dir.rglob("*") if p.is_file()}
    assert now == s.kept_before["mtimes"]

    client = MlflowClient(s.resumed.tracking_uri)
    parent = client.get_run(s.resumed.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["study"] == STUDY.name and parent.data.tags["trials_finished"] == "2"
    kids = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(k.data.tags["trial"] for k in kids) == sorted([KEPT, FAILED_ONCE])  # one child per trial
    by_trial = {k.data.tags["trial"]: k for k in kids}
    assert by_trial[KEPT].info.run_id == s.kept_before["record"]["run_id"]
    for key, run in by_trial.items():
        mode = key.split("=")[1].split("__")[0]
        tags = run.data.tags
        assert tags["study"] == STUDY.name and tags["variant"] == f"assignment={mode}" and tags["seed"] == "0"
        assert json.loads(tags["overrides"]) == {"model.decoder.assignment": mode, "train.seed": 0}
        assert run.data.params["model.decoder.assignment"] == mode  # the trial really trained that variant
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/pq_all")] == [3, STEPS]
        assert run.data.metrics[PARAMETERS_METRIC] > 0
        assert (s.sweep_dir / "trials" / key / "ray_results" / "train").is_dir()
        # the logged parameter count is the trial's model's
        from kmax_model import build_model
        from kmax_model.config_utils import load_yaml
        from pipeline.config import ExperimentConfig

        cfg = load_yaml(ExperimentConfig, str(s.sweep_dir / "trials" / key / "config.yaml"))
        assert run.data.metrics[PARAMETERS_METRIC] == sum(
            p.numel() for p in build_model(cfg.model).parameters()
        )


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_refuses_to_overwrite_without_resume(ray_session, tmp_path_factory):
    s = shared_sweep(tmp_path_factory)
    with pytest.raises(ValueError, match="pass --resume"):
        run_sweep(STUDY, s.sweep_dir, "tiny", [])


def test_sweep_script_runs_standalone():
    out = subprocess.run(
        [sys.executable, str(REPO / "ablations" / "sweep.py"), "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    assert "--study" in out.stdout and "--resume" in out.stdout and "--ray-address" in out.stdout
