"""End to end: `kmax dashboard`'s MLflow server over a real sweep's store, opened in headless Chromium."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request

import pytest

from pipeline.sweep.dashboard import start_server, stop_server
from pipeline.sweep.report import REPORT_ARTIFACT_DIR, compare
from tests.sweep_helpers import KEPT, STUDY, shared_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(*args: str) -> str:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=30000", *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    return out.stdout


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_dashboard_lists_sweep_runs_and_renders_report(ray_session, tmp_path_factory, artifacts_dir):
    from mlflow.tracking import MlflowClient

    s = shared_sweep(tmp_path_factory)
    compare(STUDY.name, s.sweep_dir, echo=lambda _: None)
    client = MlflowClient(s.resumed.tracking_uri)
    exp_id = client.get_run(s.resumed.parent_run_id).info.experiment_id
    port = _free_port()
    proc = start_server(s.resumed.tracking_uri, port=port, log_path=tmp_path_factory.mktemp("dash") / "log")
    try:
        base = f"http://127.0.0.1:{port}"
        page = f"{base}/#/experiments/{exp_id}/runs"
        dom = _chromium("--dump-dom", page)
        # the parent run is listed with its two children nested under it (collapsed by the UI)
        assert STUDY.name in dom
        kept_id = client.search_runs([exp_id], filter_string=f"tags.trial = '{KEPT}'")[0].info.run_id
        run_dom = _chromium("--dump-dom", f"{base}/#/experiments/{exp_id}/runs/{kept_id}")
        assert KEPT in run_dom and "eval/pq_all" in run_dom  # the child run's page with its metrics
        shot = artifacts_dir / "dashboard_runs.png"
        shot.unlink(missing_ok=True)
        _chromium(f"--screenshot={shot}", "--window-size=1400,900", page)
        assert shot.stat().st_size > 10_000
        # the server serves the report artifact of the parent run byte for byte ...
        report_url = (
            f"{base}/get-artifact?path={REPORT_ARTIFACT_DIR}/report.html&run_uuid={s.resumed.parent_run_id}"
        )
        with urllib.request.urlopen(report_url, timeout=30) as resp:
            served = resp.read()
        local = s.sweep_dir / "report" / "report.html"
        assert served == local.read_bytes()
        # ... and it renders: table and the three embedded plots (get-artifact answers as a download,
        # which headless Chromium does not display, so the same bytes are opened from the file)
        report_dom = _chromium("--dump-dom", local.as_uri())
        assert "comparison report" in report_dom and "assignment=cluster_softmax" in report_dom
        assert report_dom.count("data:image/png;base64,") == 3
        report_shot = artifacts_dir / "dashboard_report.png"
        _chromium(f"--screenshot={report_shot}", "--window-size=1400,1200", local.as_uri())
        assert report_shot.stat().st_size > 10_000
    finally:
        stop_server(proc)
