"""The driver's MLflow sender and the metrics journal: a store that fails keeps nothing from training,
loses nothing, and gets every step exactly once when it answers again; a resumed run replays the journal."""

from __future__ import annotations

import pytest

from pipeline import tracking
from pipeline.train import forwarder, journal
from pipeline.train.forwarder import MlflowSender


@pytest.fixture
def run(tmp_path):
    target = tracking.resolve_target(None, tmp_path)
    run_id, _ = tracking.start_or_resume_run(target, "exp", tmp_path, "run")
    return target.tracking_uri, run_id


def _steps(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted(
        (m.step, m.value) for m in tracking.RunLogger(uri, run_id).client.get_metric_history(run_id, key)
    )


def test_an_outage_keeps_everything_and_warns_once(run, monkeypatch):
    uri, run_id = run
    said: list[str] = []
    sender = MlflowSender(uri, run_id, said.append)
    real = tracking.RunLogger.log_metric_rows
    down = {"on": True}

    def flaky(self, rows):
        if down["on"]:
            raise ConnectionError("connection refused")
        return real(self, rows)

    monkeypatch.setattr(tracking.RunLogger, "log_metric_rows", flaky)
    monkeypatch.setattr(forwarder, "RETRY_S", 0.0)
    for step in range(1, 4):
        sender.add_row(step, {"train/loss": 10.0 - step}, 1000 * step)
        assert sender.try_send() is False  # the store is down: kept, never raised
    sender.add_artifact("figures/a.png", b"\x89PNG")
    assert sender.pending == 4 and len(said) == 1 and "unreachable" in said[0]  # one warning per outage
    down["on"] = False
    sender.add_row(4, {"train/loss": 6.0}, 4000)
    assert sender.try_send() is True and sender.pending == 0
    assert "answers again" in said[-1] and len(said) == 2
    assert _steps(uri, run_id, "train/loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    client = tracking.RunLogger(uri, run_id).client
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/a.png"]


def test_flush_gives_up_after_its_timeout_and_says_what_is_left(run, monkeypatch):
    uri, run_id = run
    sender = MlflowSender(uri, run_id, lambda s: None)
    monkeypatch.setattr(tracking.RunLogger, "log_metric_rows", lambda self, rows: 1 / 0)
    monkeypatch.setattr(forwarder, "RETRY_S", 0.05)
    sender.add_row(1, {"train/loss": 1.0}, 1)
    sender.finish("FINISHED")
    assert sender.flush(timeout_s=0.3) is False and sender.pending == 2


def test_a_resumed_run_replays_the_journal_once(run, tmp_path):
    """Steps 1-3 reached MLflow before a crash; the journal (written at the checkpoints) holds 1-6: the
    replay sends 4-6 only, and a recomputed step 6 coming live later is not duplicated."""
    uri, run_id = run
    rows = [
        {"step": s, "group": "train", "time_ms": s, "metrics": {"train/loss": float(s)}} for s in range(1, 7)
    ]
    journal.write_segment(str(tmp_path), rows[:3])
    journal.write_segment(str(tmp_path), rows[3:])
    assert [r["step"] for r in journal.read_rows(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    tracking.RunLogger(uri, run_id).log_metric_rows([({"train/loss": float(s)}, s, s) for s in (1, 2, 3)])
    sender = MlflowSender(uri, run_id, lambda s: None)
    for row in journal.read_rows(str(tmp_path)):
        sender.add_row(row["step"], row["metrics"], row["time_ms"])
    sender.add_row(6, {"train/loss": 6.0}, 7)
    assert sender.try_send() is True
    assert _steps(uri, run_id, "train/loss") == [(s, float(s)) for s in range(1, 7)]
