"""`kmax dashboard`: the MLflow UI over the project's tracking store.

By default it serves the embedded SQLite store of ``--run-dir`` (``<run_dir>/mlflow.db``, the store
`pipeline.tracking` writes), bound to 127.0.0.1. Artifacts (comparison reports, figures) are read
from the run's artifact location by the server, so the report HTML attached to a sweep's parent run
renders in the browser.

Given an MLflow server (``--tracking-uri http://...``, the cluster's), it starts nothing: it saves the
view there (authenticated by MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and prints its URL on
that server.

``--sweep NAME`` (or a store holding one sweep) prints the URL of that sweep's view
(pipeline.sweep.sweep_view): its trials as rows with PQ / PQ_th / PQ_st and the swept parameters as
columns, the report linked above them. Without a sweep it prints the experiment list in the UI's
model-training mode, not MLflow's GenAI start page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.sweep.study import default_sweep_dir
from pipeline.tracking import TrackingError, check_tracking_uri, existing_store
from pipeline.tracking_server import launch, server_command, server_env, stop_server

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STARTUP_TIMEOUT_S = 90.0


def start_server(
    tracking_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_path: Path | None = None
):
    """Start the MLflow UI server over ``tracking_uri`` (one worker: a local, single-user dashboard) and
    wait until ``/health`` answers; returns the `subprocess.Popen` (stop it with `stop_server`).
    Raises RuntimeError (with the server's log tail) when it does not come up."""
    command = server_command(tracking_uri, host, port)
    return launch(command, f"http://{host}:{port}", server_env(), log_path, STARTUP_TIMEOUT_S)


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


def _print_links(base: str, view, store_line: str) -> None:
    print(f"MLflow dashboard: {base}{view.path if view else EXPERIMENTS_PATH}", flush=True)
    if view is not None and view.has_report:
        print(f"  comparison report: {base}{view.report_path}", flush=True)
    print(store_line, flush=True)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import fail

    run_dir = args.run_dir or (default_sweep_dir(args.sweep) if args.sweep else DEFAULT_RUN_DIR)
    try:
        uri = existing_store(args.tracking_uri, run_dir)
        check_tracking_uri(uri)  # a server that refuses these credentials: one line, nothing written
        view = _view(uri, args.sweep)
    except (ValueError, FileNotFoundError, TrackingError) as exc:
        return fail("dashboard", exc)
    if uri.startswith(("http://", "https://")):
        # a tracking server already serves the UI over its store (and its users): no second server
        _print_links(uri.rstrip("/"), view, f"  served by the tracking server {uri} (log in as its user)")
        return 0
    proc = start_server(uri, args.host, args.port)
    _print_links(f"http://{args.host}:{args.port}", view, f"  store: {uri}; Ctrl-C stops the server")
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0
