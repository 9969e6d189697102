"""The sweep's MLflow UI view (pipeline.sweep.sweep_view) on a hand-made store: its tags, the view as a
real MLflow server and headless Chromium show it, and `kmax dashboard`'s refusals.
test_dashboard_browser.py opens `kmax dashboard --sweep` over a real sweep."""

from __future__ import annotations

import json

import pytest

from pipeline.sweep import dashboard
from pipeline.sweep.sweep_view import (
    DESCRIPTION_TAG,
    PQ_COLUMNS,
    SHARED_VIEW_TAG_PREFIX,
    list_sweeps,
    save_sweep_view,
    view_state,
)
from pipeline.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from tests.browser import CHROMIUM, NO_CHROMIUM, WINDOW, chromium, grid_rows
from tests.cluster_nodes import free_ports

SWEEP = "t_view"
SPACE = {"model.decoder.assignment": ["argmax", "cmt"], "model.decoder.coord_conv": [False, True]}
# (assignment, coord_conv, seed, PQ, PQ_th, PQ_st): every value distinct, none in PQ order of creation
TRIALS = [
    ("argmax", False, 0, 61.25, 50.5, 72.0),
    ("argmax", False, 1, 58.5, 47.25, 69.75),
    ("cmt", True, 0, 70.125, 60.0, 80.25),
    ("cmt", True, 1, 49.75, 38.5, 61.0),
]


def _add_trials(client, exp_id: str, parent: str) -> None:
    for assignment, coord_conv, seed, *pqs in TRIALS:
        variant = f"assignment={assignment},coord_conv={coord_conv}"
        tags = {"mlflow.parentRunId": parent, "variant": variant, "seed": str(seed)}
        run = client.create_run(exp_id, tags=tags, run_name=f"{variant}__seed{seed}").info.run_id
        params = {
            "model.decoder.assignment": assignment,
            "model.decoder.coord_conv": coord_conv,
            "train.seed": seed,
        }
        for key, value in params.items():
            client.log_param(run, key, value)
        for key, value in zip(("eval/pq_all", "eval/pq_things", "eval/pq_stuff"), pqs):
            client.log_metric(run, key, value, step=250)
        client.set_terminated(run)


@pytest.fixture
def store(tmp_path):
    """A sweep parent run (space, seeds, reference) with the child runs of TRIALS, and an unrelated
    experiment."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import get_or_create_experiment, resolve_target

    target = resolve_target(None, tmp_path)
    client = MlflowClient(target.tracking_uri)
    exp_id = get_or_create_experiment(target, f"sweep-{SWEEP}")
    get_or_create_experiment(target, "tiny-train")  # a training run's experiment: not a sweep
    parent = client.create_run(exp_id, tags={"kind": "sweep", "sweep": SWEEP}, run_name=SWEEP).info.run_id
    for key, value in {"space": json.dumps(SPACE), "seeds": "3", "reference": "assignment=argmax"}.items():
        client.log_param(parent, key, value)
    _add_trials(client, exp_id, parent)
    return tmp_path, target.tracking_uri, client, exp_id, parent


def _view_tags(client, exp_id: str) -> dict[str, str]:
    tags = client.get_experiment(exp_id).tags
    return {k: v for k, v in tags.items() if k.startswith(SHARED_VIEW_TAG_PREFIX)}


def test_the_view_selects_pq_and_swept_columns_ordered_by_pq(store):
    _, uri, client, exp_id, parent = store
    view = save_sweep_view(uri, SWEEP)
    assert (view.experiment_id, view.parent_run_id, view.has_report) == (exp_id, parent, False)
    saved = _view_tags(client, exp_id)
    assert list(saved) == [SHARED_VIEW_TAG_PREFIX + view.share_key]
    state = json.loads(saved[SHARED_VIEW_TAG_PREFIX + view.share_key])
    assert state == view_state(list(SPACE))
    assert state["selectedColumns"] == [
        "tags.`variant`", "params.`train.seed`",
        "metrics.`eval/pq_all`", "metrics.`eval/pq_things`", "metrics.`eval/pq_stuff`",
        "params.`model.decoder.assignment`", "params.`model.decoder.coord_conv`",
    ]  # fmt: skip
    # ordered by a metric, the UI lists child runs as rows of their own instead of nesting them
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`eval/pq_all`", False)
    assert view.path == (
        f"/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={view.share_key}"
    )
    experiment = client.get_experiment(exp_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert (
        "no comparison report yet (`kmax compare --sweep t_view` writes it)"
        in experiment.tags[DESCRIPTION_TAG]
    )
    assert save_sweep_view(uri, SWEEP).share_key == view.share_key  # the same view: the same key and tag
    assert len(_view_tags(client, exp_id)) == 1


def test_once_the_report_is_logged_the_description_links_it(store, tmp_path_factory):
    _, uri, client, exp_id, parent = store
    report = tmp_path_factory.mktemp("report") / "report.html"
    report.write_text("<html>report</html>")
    client.log_artifact(parent, str(report), "report")
    view = save_sweep_view(uri, SWEEP)
    assert view.has_report
    assert view.report_path == (
        f"/#/experiments/{exp_id}/runs/{parent}/artifactPath/report/report.html?workflowType=machine_learning"
    )
    first_line = client.get_experiment(exp_id).tags[DESCRIPTION_TAG].splitlines()[0]
    assert f"]({view.report_path})" in first_line  # the line the collapsed description shows


def test_sweeps_are_listed_and_an_unknown_one_is_named(store):
    _, uri, client, *_ = store
    assert list_sweeps(uri) == [SWEEP]
    # every experiment the pipeline creates opens as model training, a sweep's or not
    assert client.get_experiment_by_name("tiny-train").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    with pytest.raises(ValueError, match=f"--sweep nope: no experiment 'sweep-nope' in {uri}"):
        save_sweep_view(uri, "nope")


def test_dashboard_refuses_an_unknown_sweep_or_missing_store_before_starting_a_server(
    store, tmp_path, monkeypatch, capsys
):
    import argparse

    run_dir, *_ = store

    def no_server(*args, **kwargs):
        raise AssertionError("the server must not start")

    monkeypatch.setattr(dashboard, "start_server", no_server)
    parser = argparse.ArgumentParser()
    dashboard.add_arguments(parser)
    assert dashboard.run(parser.parse_args(["--run-dir", str(run_dir), "--sweep", "nope"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"kmax dashboard: --sweep nope: no experiment 'sweep-nope' in sqlite:///{run_dir}/mlflow.db"
    ]
    assert dashboard.run(parser.parse_args(["--run-dir", str(tmp_path / "none"), "--sweep", SWEEP])) == 2
    assert "no tracking store at" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_browser_shows_every_trial_best_pq_first_with_its_columns(store, artifacts_dir):
    """MLflow's UI applies the view: a row per trial, best PQ first, the selected columns; the parent last."""
    run_dir, uri, *_ = store
    view = save_sweep_view(uri, SWEEP)
    (port,) = free_ports(1)
    server = dashboard.start_server(uri, port=port, log_path=run_dir / "server.log")
    try:
        url = f"http://127.0.0.1:{port}{view.path}"
        rows = grid_rows(chromium("--dump-dom", WINDOW, url))
        shot = artifacts_dir / "dashboard_sweep_view.png"
        shot.unlink(missing_ok=True)
        chromium(f"--screenshot={shot}", WINDOW, url)
        assert shot.stat().st_size > 10_000
    finally:
        dashboard.stop_server(server)
    params = [f"params.`{p}`" for p in (*SPACE, "train.seed")]
    shown = [(*(r[p] for p in params), *(float(r[f"metrics.`{k}`"]) for k in PQ_COLUMNS)) for r in rows[:-1]]
    expected = sorted(((a, str(c), str(s), *pqs) for a, c, s, *pqs in TRIALS), key=lambda t: -t[3])
    assert shown == expected
    assert [r["tags.`variant`"] for r in rows[:-1]] == [
        f"assignment={a},coord_conv={c}" for a, c, *_ in expected
    ]
    assert rows[-1]["metrics.`eval/pq_all`"] == "-"  # the parent: no PQ of its own, sorted after its trials
