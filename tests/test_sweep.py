"""The Tune sweep: resources formula, trial keys, a real 2-trial sweep interrupted then resumed, MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_experiment, with_absolute_paths, with_fields
from pipeline.ray_setup import run_cpu_need
from pipeline.sweep.asha import AshaConfig
from pipeline.sweep.driver import DRIVER_CPUS, max_concurrent_trials, run_sweep
from pipeline.sweep.study import Study, trial_key
from pipeline.sweep.trial import DONE_FILE, PARAMETERS_METRIC
from tests.sweep_helpers import FAILED_ONCE, KEPT, OVERRIDES, STEPS, STUDY, shared_sweep

REPO = Path(__file__).resolve().parents[1]


def test_max_concurrent_trials_formula():
    # need = 0.25 driver + 1 x 0.5 worker + 1 data = 1.75 -> floor(4 / 1.75) = 2
    assert run_cpu_need(1, 0.5, DRIVER_CPUS) == 1.75
    assert max_concurrent_trials(4, run_cpu_need(1, 0.5, DRIVER_CPUS)) == 2
    # 16 CPUs, 2 workers x 1 CPU: need 3.25 -> 4 trials
    assert max_concurrent_trials(16, run_cpu_need(2, 1.0, DRIVER_CPUS)) == 4
    # exact fit counts: need 2.0 on 2 CPUs -> 1
    assert max_concurrent_trials(2, run_cpu_need(1, 0.5, driver_cpus=0.5)) == 1
    with pytest.raises(ValueError, match="one trial needs 2.25 CPUs"):
        max_concurrent_trials(2, run_cpu_need(1, 1.0, DRIVER_CPUS))


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
def test_trial_configs_are_base_plus_overrides_and_tune_sees_the_dimensions(ray_session, tmp_path_factory):
    """Typed configs end to end: each trial's config is the base with its point and its locations applied
    once (what the trial trained, bound to the data's classes, is that config); Tune's own result table has
    a column per swept path, and its run and trial names are deterministic."""
    from kmax_model.config_utils import load_yaml
    from pipeline.config import ExperimentConfig
    from pipeline.train.driver import bind_data

    s = shared_sweep(tmp_path_factory)
    base = with_absolute_paths(s.base)
    for key, spec in s.resumed.specs.items():
        locations = {
            "run_dir": str(s.sweep_dir / "trials" / key),
            "tracking.uri": s.resumed.tracking_uri,
            "tracking.experiment_name": f"sweep-{STUDY.name}",
            "tracking.run_name": key,
        }
        assert spec.point == {"model.decoder.assignment": key.split("=")[1].split("__")[0], "train.seed": 0}
        assert spec.cfg == with_fields(base, {**spec.point, **locations})
        ran = load_yaml(ExperimentConfig, str(Path(spec.location) / "config.yaml"))
        assert ran == bind_data(spec.cfg)
    # Tune's table holds the trials that reported: argmax in the first call (cluster_softmax failed at its
    # first step), cluster_softmax in the resumed call, which ran only it
    for summary, ran in ((s.first, "argmax"), (s.resumed, "cluster_softmax")):
        table = summary.results.get_dataframe()
        assert {"config/model.decoder.assignment", "config/train.seed"} <= set(table.columns)
        assert table["config/model.decoder.assignment"].tolist() == [ran]
        assert table["config/train.seed"].tolist() == [0]
    assert sorted(r.config["model.decoder.assignment"] for r in s.first.results) == [
        "argmax",
        "cluster_softmax",
    ]
    assert sorted(Path(r.path).name for r in s.first.results) == sorted([KEPT, FAILED_ONCE])
    assert {Path(r.path).parent for r in s.first.results} == {s.sweep_dir / "tune" / f"tune-{STUDY.name}"}


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_refuses_to_overwrite_without_resume(ray_session, tmp_path_factory):
    s = shared_sweep(tmp_path_factory)
    with pytest.raises(ValueError, match="pass --resume"):
        run_sweep(STUDY, s.sweep_dir, s.base)


def test_sweep_script_runs_standalone():
    out = subprocess.run(
        [sys.executable, str(REPO / "ablations" / "sweep.py"), "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        check=True,
    )
    assert "--study" in out.stdout and "--resume" in out.stdout and "--ray-address" in out.stdout


def test_asha_config_validation_and_rungs():
    with pytest.raises(ValueError, match="asha.reduction_factor"):
        AshaConfig(reduction_factor=1)
    with pytest.raises(ValueError, match="train.eval_interval > 0"):
        AshaConfig().scheduler(steps=10, eval_interval=0)
    sched = AshaConfig(grace_evals=1, reduction_factor=2).scheduler(steps=10, eval_interval=5)
    assert sched._max_t == 3  # two validations + the trial's final report


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_the_trial_behind_on_pq_and_later_trials_still_run(ray_session, tmp_path_factory):
    """Three trials one at a time (4 logical CPUs, 3.25 per trial): 'a' keeps every predicted segment (all
    post-processing thresholds 0, so even a model of 12 steps scores PQ > 0); 'b' voids every segment through
    its post-processing area limit, so its validation PQ is exactly 0 and ASHA stops it at its first rung
    (behind 'a'); 'c' (= 'a') must still get its workers afterwards (the stopped trial's placement group is
    released, reference_ray_mlflow.md) and finish. The stopped trial is closed FINISHED + early_stopped in
    MLflow, counted in the report and kept by --resume.

    Tune's stop is asynchronous (the trial trains on until its actor is torn down), so 'b' gets 24 steps
    after its first validation for the stop to land: it must end before its 3rd validation, not at step 12.
    'c' goes on at every rung only because it scores exactly what 'a' scored: a trial's training is
    reproducible (seeded data order, per-step seeds), asserted below."""
    from mlflow.tracking import MlflowClient

    from pipeline.data.synthetic import make_prepared_synthetic
    from pipeline.sweep.report import load_sweep

    root = tmp_path_factory.mktemp("asha")
    data = make_prepared_synthetic(root / "data", train=8, val=4, height=48, width=48, seed=0, progress=False)
    limit = "model.postprocess.stuff_area_limit"
    study = Study("t_asha", {limit: [0, 100000, 1]})
    keys = [trial_key(t, study) for t in study.trials()]
    replaced = ("train.steps", "train.eval_interval", "train.checkpoint")
    overrides = [
        f"data.prepared_dir={data}",
        *[o for o in OVERRIDES if not o.startswith(replaced)],
        "train.steps=36",
        "train.eval_interval=12",
        "model.postprocess.thing_threshold=0.0",
        "model.postprocess.stuff_threshold=0.0",
        "model.postprocess.thing_area_limit=0",
        "model.postprocess.pixel_confidence_threshold=0.0",
        "model.postprocess.overlap_threshold=0.0",
        "scaling.cpus_per_worker=2",  # with num_workers=1 from OVERRIDES: 3.25 CPUs, one trial at a time
    ]
    base = load_experiment("tiny", overrides)
    lines: list[str] = []
    summary = run_sweep(study, root / "sweep", base, asha=AshaConfig(1, 2), echo=lines.append)
    assert summary.failed == [] and summary.finished == keys and summary.stopped == [keys[1]]
    # one at a time, in the study's order (Tune ignores max_concurrent_trials beside a BasicVariantGenerator:
    # the limit must be the generator's, or the three trials race for the workers and 'b' may run first)
    trial_of_line = [ln[1 : ln.index("]")] for ln in lines if ln.startswith("[") and "by ASHA" not in ln]
    runs_in_order = [k for i, k in enumerate(trial_of_line) if i == 0 or trial_of_line[i - 1] != k]
    assert runs_in_order == keys

    client = MlflowClient(summary.tracking_uri)
    exp = client.get_experiment_by_name("sweep-t_asha")
    runs = {r.data.tags["trial"]: r for r in client.search_runs([exp.experiment_id], "tags.trial != ''")}
    pq = {k: [m.value for m in client.get_metric_history(runs[k].info.run_id, "eval/pq_all")] for k in keys}
    assert pq[keys[0]][0] > 0 and pq[keys[1]][0] == 0.0
    assert pq[keys[0]] == pq[keys[2]] and len(pq[keys[0]]) == 3  # a and c: the same run, to the end
    assert 1 <= len(pq[keys[1]]) < 3 and set(pq[keys[1]]) == {0.0}  # b stopped before its end
    stopped = runs[keys[1]]
    assert stopped.info.status == "FINISHED" and stopped.data.tags["early_stopped"] == "true"
    done = json.loads((root / "sweep" / "trials" / keys[1] / DONE_FILE).read_text())
    assert done["early_stopped"] is True and done["metrics"]["step"] in (12, 24)
    rows = {r.variant: r for r in load_sweep(summary.tracking_uri, "t_asha").rows}
    assert rows["stuff_area_limit=100000"].early_stopped == 1
    again = run_sweep(study, root / "sweep", base, resume=True, asha=AshaConfig(1, 2))
    assert again.skipped == keys and again.finished == []
