"""`kmax dashboard`: the MLflow UI over the project's tracking store.

By default it serves the embedded SQLite store of ``--run-dir`` (``<run_dir>/mlflow.db``, the store
`pipeline.tracking` writes), bound to 127.0.0.1. Artifacts (comparison reports, figures) are read
from the run's artifact location by the server, so the report HTML attached to a sweep's parent run
renders in the browser.

``--sweep NAME`` (or a store holding one sweep) prints the URL of that sweep's view
(pipeline.sweep.sweep_view): its trials as rows with PQ / PQ_th / PQ_st and the swept parameters as
columns, the report linked above them. Without a sweep it prints the experiment list in the UI's
model-training mode, not MLflow's GenAI start page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.sweep.study import default_sweep_dir
from pipeline.tracking import existing_store

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STARTUP_TIMEOUT_S = 90.0


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The `mlflow server` command line (one worker: a local, single-user dashboard)."""
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow_bin is None:
        raise RuntimeError("the `mlflow` executable is not installed next to this Python; run `make install`")
    return [
        mlflow_bin, "server",
        "--backend-store-uri", tracking_uri,
        "--host", host, "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip


def start_server(
    tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_path: Path | None = None
):
    """Start the MLflow UI server and wait until ``/health`` answers; returns the `subprocess.Popen`.

    The server runs in its own process group so that `stop_server` ends its uvicorn children too.
    Raises RuntimeError (with the server's log tail) when it does not come up.
    """
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the process
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        server_command(tracking_uri, host, port), stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path else ""
            raise RuntimeError(
                f"mlflow server exited with code {proc.returncode} before answering at {url}\n{tail}"
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer at {url} within {STARTUP_TIMEOUT_S:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its job runners exit with it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


DEFAULT_RUN_DIR = "runs/demo"
EXPERIMENTS_PATH = "/#/experiments?workflowType=machine_learning"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", help="open on this sweep's trials, e.g. assignment (default: the store's "
                        "only sweep, else the experiment list)")  # fmt: skip
    parser.add_argument(
        "--run-dir", help=f"directory holding the embedded mlflow.db (default: runs/sweeps/<sweep> with "
        f"--sweep, else {DEFAULT_RUN_DIR})",
    )  # fmt: skip
    parser.add_argument("--tracking-uri", default=None, help="another tracking store (overrides --run-dir)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="bind address (default: localhost only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)


def _view(uri: str, sweep: str | None):
    """The sweep's saved view (None without a sweep to open); ValueError for an unknown sweep."""
    from pipeline.sweep.sweep_view import list_sweeps, save_sweep_view

    if sweep is None:
        sweeps = list_sweeps(uri)
        if len(sweeps) != 1:
            if sweeps:
                print(f"sweeps in this store: {', '.join(sweeps)} (open one with --sweep NAME)")
            return None
        sweep = sweeps[0]
    return save_sweep_view(uri, sweep)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import fail

    run_dir = args.run_dir or (default_sweep_dir(args.sweep) if args.sweep else DEFAULT_RUN_DIR)
    try:
        uri = existing_store(args.tracking_uri, run_dir)
        view = _view(uri, args.sweep)
    except (ValueError, FileNotFoundError) as exc:
        return fail("dashboard", exc)
    proc = start_server(uri, args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow dashboard: {base}{view.path if view else EXPERIMENTS_PATH}", flush=True)
    if view is not None and view.has_report:
        print(f"  comparison report: {base}{view.report_path}", flush=True)
    print(f"  store: {uri}; Ctrl-C stops the server", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0
