"""End to end: `kmax dashboard --sweep` over a real sweep's store, its printed URL opened in headless
Chromium: the trials' rows with their PQ columns, the report linked, and the report served and rendered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.sweep.report import REPORT_ARTIFACT_DIR, compare
from pipeline.sweep.sweep_view import PQ_COLUMNS, column
from tests.browser import CHROMIUM, NO_CHROMIUM, WINDOW, chromium, grid_rows
from tests.cluster_nodes import free_ports
from tests.sweep_helpers import STUDY, shared_sweep


def _start_dashboard(run_dir: Path, sweep: str, port: int) -> tuple[subprocess.Popen, list[str]]:
    """`kmax dashboard --sweep` as a user runs it; returns the process and its first printed lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "dashboard", "--run-dir", str(run_dir), "--sweep", sweep,
         "--port", str(port)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines = [proc.stdout.readline().strip() for _ in range(3)]
    return proc, lines


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_dashboard_opens_on_the_sweeps_trials_and_report(ray_session, tmp_path_factory, artifacts_dir):
    from mlflow.tracking import MlflowClient

    s = shared_sweep(tmp_path_factory)
    compare(STUDY.name, s.sweep_dir, echo=lambda _: None)
    client = MlflowClient(s.resumed.tracking_uri)
    children = client.search_runs(
        [client.get_run(s.resumed.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{s.resumed.parent_run_id}'",
    )
    assert len(children) == 2
    (port,) = free_ports(1)
    proc, lines = _start_dashboard(s.sweep_dir, STUDY.name, port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert lines[0].startswith(f"MLflow dashboard: {base}/#/experiments/"), lines
        view_url = lines[0].removeprefix("MLflow dashboard: ")
        report_url = lines[1].removeprefix("comparison report: ")
        assert "workflowType=machine_learning" in view_url and "viewStateShareKey=" in view_url
        dom = chromium("--dump-dom", WINDOW, view_url)
        assert "Error loading shared view state" not in dom
        rows = grid_rows(dom)
        swept = column("params", "model.decoder.assignment")
        pq, pq_th, pq_st = (column("metrics", k) for k in PQ_COLUMNS)
        by_variant = {r[column("tags", "variant")]: r for r in rows if r.get(pq, "-") != "-"}
        # every child is a row of its own (not collapsed under the parent) with its PQ / PQ_th / PQ_st and
        # swept value as the store holds them (printed as shortest round-trip floats). Six steps leave every
        # PQ at 0 here, so the order by PQ is checked on hand-made runs (test_sweep_view.py).
        assert set(by_variant) == {run.data.tags["variant"] for run in children}
        for run in children:
            row = by_variant[run.data.tags["variant"]]
            for col, key in ((pq, "eval/pq_all"), (pq_th, "eval/pq_things"), (pq_st, "eval/pq_stuff")):
                assert float(row[col]) == run.data.metrics[key], (col, row)
            assert row[swept] == run.data.params["model.decoder.assignment"]
        # the report is one click away: the description above the table links the parent run's report
        assert f'href="{report_url.removeprefix(base)}"' in dom
        shot = artifacts_dir / "dashboard_real_sweep.png"
        shot.unlink(missing_ok=True)
        chromium(f"--screenshot={shot}", WINDOW, view_url)
        assert shot.stat().st_size > 10_000
        # the server serves the report artifact of the parent run byte for byte ...
        artifact = (
            f"{base}/get-artifact?path={REPORT_ARTIFACT_DIR}/report.html&run_uuid={s.resumed.parent_run_id}"
        )
        with urllib.request.urlopen(artifact, timeout=30) as resp:
            served = resp.read()
        local = s.sweep_dir / "report" / "report.html"
        assert served == local.read_bytes()
        # ... and it renders: table and the three embedded plots (get-artifact answers as a download,
        # which headless Chromium does not display, so the same bytes are opened from the file)
        report_dom = chromium("--dump-dom", local.as_uri())
        assert "comparison report" in report_dom and "assignment=cluster_softmax" in report_dom
        assert report_dom.count("data:image/png;base64,") == 3
        report_shot = artifacts_dir / "dashboard_report.png"
        chromium(f"--screenshot={report_shot}", "--window-size=1400,1200", local.as_uri())
        assert report_shot.stat().st_size > 10_000
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the command stops its server and exits 0
        assert proc.wait(timeout=60) == 0
