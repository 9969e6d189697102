"""Training that does not depend on the tracking server, and resumes past a damaged checkpoint.

* A real `mlflow server` killed at step ~10 of a run and started again later: the steps never pause for
  it, and MLflow ends with every step exactly once (the driver keeps what the store refused and sends it
  when it answers again).
* A server that never comes back: the run still finishes (after `tracking.final_flush_s`), says so in
  one message, and its journal holds every step.
* The two newest checkpoints damaged (one truncated, one garbage): the run resumes from the one before,
  names both, and keeps them as they are.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.train.driver import fit
from pipeline.train.journal import read_rows
from pipeline.train.resume import checkpoint_names
from tests.cluster_nodes import MlflowServer
from tests.train_helpers import make_data, metric_steps, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 40
OUTAGE_AT = 10
OUTAGE_S = 12.0


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("resilience"))


def _long_config(data_dir: Path, run_dir: Path, uri: str, *extra: str):
    return tiny_config(
        data_dir, run_dir, f"tracking.uri={uri}", f"train.steps={STEPS}", "train.eval_interval=0",
        "train.checkpoint_interval=10", "data.num_vis_images=0", *extra,
    )  # fmt: skip


def _when_step(progress: Path, step: int, action, timeout: float = 300.0) -> threading.Thread:
    """A thread that runs ``action()`` once the run's progress file shows ``step``."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if progress.exists() and f'"step": {step},' in progress.read_text():
                action()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _step_gaps_ms(run_dir: Path) -> list[int]:
    times = [r["time_ms"] for r in read_rows(str(run_dir)) if r["group"] == "train"]
    return [b - a for a, b in zip(times, times[1:])]


def test_the_tracking_server_going_down_never_pauses_training(data_dir, tmp_path, capsys):
    server = MlflowServer(tmp_path / "mlflow").start()
    said: list[str] = []
    outage: dict[str, float] = {}

    def restart_later() -> None:
        outage["down"] = time.time()
        server.stop()
        time.sleep(OUTAGE_S)
        server.start()
        outage["up"] = time.time()

    run_dir = tmp_path / "run"
    watcher = _when_step(run_dir / "progress.jsonl", OUTAGE_AT, restart_later)
    try:
        summary = fit(_long_config(data_dir, run_dir, server.uri), echo=said.append)
        watcher.join(60)
        assert summary.steps == STEPS and summary.unsent == 0
        assert [s for s, _ in metric_steps(server.uri, summary.mlflow_run_id, "train/loss")] == list(
            range(1, STEPS + 1)
        )  # every step once, those of the outage included
    finally:
        server.stop()
    assert "up" in outage, "the run ended before the outage was over: lengthen it"
    _print_timeline(run_dir, outage, said, capsys)
    gaps = _step_gaps_ms(run_dir)
    assert max(gaps) < 4000, gaps  # no pause: a step (and a checkpoint) take well under a second here
    assert sum("unreachable" in line for line in said) == 1 and any("answers again" in line for line in said)


def _print_timeline(run_dir: Path, outage: dict[str, float], said: list[str], capsys) -> None:
    """The outage against the steps (shown with ``pytest -s``): when the server went and came back, which
    steps ran meanwhile, the longest wait between two steps."""
    rows = [r for r in read_rows(str(run_dir)) if r["group"] == "train"]
    t0 = rows[0]["time_ms"] / 1000
    during = [r["step"] for r in rows if outage["down"] <= r["time_ms"] / 1000 <= outage["up"]]
    notes = [line for line in said if "MLflow store" in line]
    with capsys.disabled():
        print(
            f"\noutage timeline: step 1 at 0.0 s; server stopped at {outage['down'] - t0:.1f} s, started "
            f"again at {outage['up'] - t0:.1f} s; steps {during[0]}-{during[-1]} ran meanwhile; last step "
            f"{rows[-1]['step']} at {rows[-1]['time_ms'] / 1000 - t0:.1f} s; longest gap between steps "
            f"{max(_step_gaps_ms(run_dir)) / 1000:.2f} s; the driver said: {notes}"
        )


def test_a_server_that_never_comes_back_leaves_a_complete_journal(data_dir, tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start()
    said: list[str] = []
    run_dir = tmp_path / "run"
    watcher = _when_step(run_dir / "progress.jsonl", OUTAGE_AT, server.stop)
    try:
        summary = fit(
            _long_config(data_dir, run_dir, server.uri, "tracking.final_flush_s=2"), echo=said.append
        )
    finally:
        watcher.join(60)
        server.stop()
    assert summary.steps == STEPS and summary.unsent > 0
    end = [line for line in said if "did not answer at the end" in line]
    assert len(end) == 1 and str(run_dir / "journal") in end[0]
    train_steps = [r["step"] for r in read_rows(str(run_dir)) if r["group"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))


def test_resume_skips_damaged_checkpoints_names_them_and_keeps_them(data_dir, tmp_path):
    run_dir = tmp_path / "damaged"
    every_step = ("train.checkpoint_interval=1", "train.num_to_keep=10", "train.eval_interval=0")
    fit(tiny_config(data_dir, run_dir, *every_step))
    root = run_dir / "ray_results" / "train"
    assert checkpoint_names(str(run_dir))[:3] == [
        "checkpoint_0000004",
        "checkpoint_0000003",
        "checkpoint_0000002",
    ]
    truncated, garbage = root / "checkpoint_0000004" / "state.pt", root / "checkpoint_0000003" / "state.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    garbage.write_bytes(b"\x00garbage" * 100)
    damaged = {p: p.read_bytes() for p in (truncated, garbage)}
    said: list[str] = []
    resumed = fit(tiny_config(data_dir, run_dir, *every_step, "train.steps=6"), echo=said.append)
    assert resumed.steps == 6
    skipped = [line for line in said if "skipping damaged checkpoint" in line]
    assert any("checkpoint_0000004" in line for line in skipped) and any(
        "checkpoint_0000003" in line for line in skipped
    )
    assert any(line.startswith("resuming from") and "checkpoint_0000002" in line for line in said)
    records = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    progress = [r for r in records if "loss" in r]
    assert [r["step"] for r in progress] == [1, 2, 3, 4, 3, 4, 5, 6]  # the second run went on from step 2
    assert {p: p.read_bytes() for p in damaged} == damaged  # kept as they were
    assert {"checkpoint_0000003_1", "checkpoint_0000004_1"} <= set(checkpoint_names(str(run_dir)))
