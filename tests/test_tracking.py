"""MLflow tracking on a real SQLite store: run creation/resume, contiguous steps, params, artifacts."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from pipeline import tracking
from pipeline.eval.visualize import close, cluster_assignment_figure


def test_embedded_store_run_resume_and_contiguous_metrics(tmp_path):
    target = tracking.resolve_target(None, tmp_path)
    assert target.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    tracking.check_tracking_uri(target.tracking_uri)
    run_id, resumed = tracking.start_or_resume_run(target, "exp-a", tmp_path, "run-1")
    assert not resumed
    saved = json.loads((tmp_path / tracking.RUN_ID_FILE).read_text())
    assert saved["run_id"] == run_id

    log = tracking.RunLogger(target.tracking_uri, run_id)
    log.log_params(tracking.flatten_params({"model": {"k": 3, "t": [1, 2]}, "lr": 0.1}))
    for step in range(1, 6):
        log.log_metrics({"loss": 10.0 - step, "lr": 0.1}, step)
    log.log_dict({"a": 1}, "config.json")
    fig = cluster_assignment_figure(np.zeros((3, 8, 8)), [np.eye(8, dtype=int)] * 2)
    log.log_figure(fig, "figures/clusters.png")
    close(fig)

    # a failure, then a resume from a checkpoint at step 3: steps 4, 5 are recomputed (values differ)
    run_id2, resumed = tracking.start_or_resume_run(target, "exp-a", tmp_path, "run-1")
    assert (run_id2, resumed) == (run_id, True)
    log2 = tracking.RunLogger(target.tracking_uri, run_id)
    assert log2.has_params()
    written = [log2.log_metrics({"loss": 100.0 + step, "lr": 0.1}, step) for step in range(4, 9)]
    assert written == [0, 0, 2, 2, 2]
    log2.finish()

    client = log2.client
    hist = client.get_metric_history(run_id, "loss")
    steps = sorted(m.step for m in hist)
    assert steps == list(range(1, 9))  # contiguous, no duplicate
    by_step = {m.step: m.value for m in hist}
    assert by_step[5] == 5.0 and by_step[6] == 106.0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.k": "3", "model.t": "[1, 2]", "lr": "0.1"}
    arts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "figures")
    }
    assert {"config.json", "figures/clusters.png"} <= arts
    png = client.download_artifacts(run_id, "figures/clusters.png", str(tmp_path / "dl"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # experiment lists exactly one run
    exp = client.get_experiment_by_name("exp-a")
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_unreachable_server_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(tracking.TrackingError, match=f"127.0.0.1:{port} is unreachable"):
        tracking.check_tracking_uri(f"http://127.0.0.1:{port}", timeout_s=2)


def test_flatten_params_truncates_and_nests():
    flat = tracking.flatten_params({"a": {"b": {"c": 1}}, "s": "x" * 7000})
    assert flat["a.b.c"] == "1" and len(flat["s"]) == tracking.MAX_PARAM_VALUE


def test_a_run_is_resumed_by_its_id_in_the_same_store_at_another_address(tmp_path):
    """A store outlives the address it was reached at (a database-backed server on a replaced head): the
    run recorded under the old URI is found by its id in the store at the new one, resumed, and the
    record follows; a record whose URI is this store's but whose run is not there is refused."""
    target = tracking.resolve_target(None, tmp_path)
    run_id, _ = tracking.start_or_resume_run(target, "exp", tmp_path, "run")
    moved = tracking.TrackingTarget(f"sqlite:///{tmp_path}/../{tmp_path.name}/mlflow.db", None)
    assert moved.tracking_uri != target.tracking_uri
    assert tracking.start_or_resume_run(moved, "exp", tmp_path, "run") == (run_id, True)
    assert json.loads((tmp_path / tracking.RUN_ID_FILE).read_text())["tracking_uri"] == moved.tracking_uri
    other = tracking.resolve_target(None, tmp_path / "other")  # another store: a new run there
    new_id, resumed = tracking.start_or_resume_run(other, "exp", tmp_path, "run")
    assert not resumed and new_id != run_id
    lost = {"tracking_uri": other.tracking_uri, "run_id": "0" * 32}  # this store's record, its run gone
    (tmp_path / tracking.RUN_ID_FILE).write_text(json.dumps(lost))
    with pytest.raises(tracking.TrackingError, match=f"names MLflow run {'0' * 32}, which is not in"):
        tracking.start_or_resume_run(other, "exp", tmp_path, "run")


def test_credentials_come_from_the_environment_or_mlflows_file(tmp_path, monkeypatch):
    for key in (*tracking.CREDENTIAL_VARIABLES, tracking.TOKEN_VARIABLE):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.credential_env() == {}
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = alice\nmlflow_tracking_password = from-the-file\n"
    )
    expected = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "from-the-file"}
    assert tracking.credential_env() == expected
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-env")  # the environment wins, as in MLflow
    assert tracking.credential_env()["MLFLOW_TRACKING_PASSWORD"] == "from-the-env"
