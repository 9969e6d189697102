"""The driver's side of a run's reports: progress printed, metrics and artifacts sent to MLflow, outages
ridden out.

A `Forwarder` thread drains the run's `pipeline.train.run_log.RunChannel` every `POLL_S` seconds: progress
records are appended to ``<run_dir>/progress.jsonl`` and printed; metric rows and artifacts go to a
`MlflowSender`. The sender keeps whatever MLflow refuses (a tracking server down or restarting) and tries
again every `RETRY_S` seconds, warning once per outage and once when the server is back. The workers never
wait for any of it; what they logged up to each checkpoint is also in the journal under the run's storage
(pipeline.train.journal), which a resumed run replays.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

from pipeline.train.progress import ProgressLines

POLL_S = 0.5
"""Seconds between two drains of the run's channel."""
RETRY_S = 5.0
"""Seconds between two attempts to reach an MLflow store that refused a write."""
FINAL_FLUSH_S = 30.0
"""How long the end of a run waits for an unreachable MLflow store before leaving the rest to the journal."""
HTTP_RETRIES = "1"
"""MLflow's own retries of a failed HTTP call (its default backs off for minutes): the sender retries
itself, and must notice an outage in seconds."""


class MlflowSender:
    """Metric rows and artifacts for one MLflow run, sent in order; kept and retried when the store fails.

    ``echo``: where the outage and recovery messages go. Each attempt opens a fresh
    `pipeline.tracking.RunLogger` after a failure, which reads the steps the store already holds, so a
    batch that was half written before the outage is completed without a duplicate.
    """

    def __init__(self, tracking_uri: str, run_id: str, echo):
        self.tracking_uri, self.run_id, self.echo = tracking_uri, run_id, echo
        self.rows: list[tuple[dict, int, int]] = []
        self.artifacts: list[tuple[str, bytes]] = []
        self.status: str | None = None
        self.down_since: float | None = None
        self._next_try = 0.0
        self._logger = None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)

    @property
    def pending(self) -> int:
        return len(self.rows) + len(self.artifacts) + (self.status is not None)

    def add_row(self, step: int, metrics: dict[str, float], time_ms: int) -> None:
        self.rows.append((metrics, step, time_ms))

    def add_artifact(self, name: str, data: bytes) -> None:
        self.artifacts.append((name, data))

    def finish(self, status: str) -> None:
        """Close the run with ``status`` once everything before is sent."""
        self.status = status

    def try_send(self, force: bool = False) -> bool:
        """Send what is pending (unless waiting out a retry delay); True when nothing is left."""
        if not self.pending or (not force and time.monotonic() < self._next_try):
            return not self.pending
        try:
            self._send()
        except Exception as exc:  # any store failure: keep everything, try again later
            self._logger = None
            self._next_try = time.monotonic() + RETRY_S
            if self.down_since is None:
                self.down_since = time.time()
                self.echo(
                    f"warning: MLflow store {self.tracking_uri} is unreachable ({type(exc).__name__}); "
                    "training goes on, its metrics are kept and sent when the store answers again"
                )
            return False
        if self.down_since is not None:
            away = time.time() - self.down_since
            self.echo(f"MLflow store {self.tracking_uri} answers again after {away:.0f} s")
            self.down_since = None
        return True

    def _send(self) -> None:
        from pipeline.tracking import RunLogger

        self._logger = self._logger or RunLogger(self.tracking_uri, self.run_id)
        if self.rows:
            self._logger.log_metric_rows(self.rows)
            self.rows = []
        while self.artifacts:
            name, data = self.artifacts[0]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(name).name
                path.write_bytes(data)
                self._logger.log_artifact(path, str(Path(name).parent) if "/" in name else None)
            self.artifacts.pop(0)
        if self.status is not None:
            self._logger.finish(self.status)
            self.status = None

    def flush(self, timeout_s: float = FINAL_FLUSH_S) -> bool:
        """Try to send everything within ``timeout_s``; True when all went through."""
        deadline = time.monotonic() + timeout_s
        while not self.try_send(force=True):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(RETRY_S, max(0.0, deadline - time.monotonic())))
        return True


class Forwarder(threading.Thread):
    """Drains a run's channel while it trains (see the module docstring).

    Args:
        channel: the run's RunChannel actor handle.
        sender: the run's MlflowSender.
        progress_file: the driver's local progress file.
        lines: formats the progress records; echo: prints a line.
    Use ``start()``, then ``stop.set()`` and ``join()``: the last events are handled before it exits.
    """

    def __init__(self, channel, sender: MlflowSender, progress_file: str, lines: ProgressLines, echo):
        super().__init__(daemon=True, name="run-forwarder")
        self.channel, self.sender, self.lines, self.echo = channel, sender, lines, echo
        self.progress_file = Path(progress_file)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(POLL_S)
        self.poll()

    def poll(self) -> None:
        import ray

        for event in ray.get(self.channel.take.remote()):
            self.handle(event)
        self.sender.try_send()

    def handle(self, event: dict) -> None:
        kind = event["kind"]
        if kind == "metrics":
            self.sender.add_row(event["step"], event["metrics"], event["time_ms"])
        elif kind == "artifact":
            self.sender.add_artifact(event["name"], event["data"])
        elif kind == "progress":
            self.progress_file.parent.mkdir(parents=True, exist_ok=True)
            with self.progress_file.open("a") as f:
                f.write(json.dumps(event["record"]) + "\n")
            line = self.lines.format(event["record"])
            if line:
                self.echo(line)
