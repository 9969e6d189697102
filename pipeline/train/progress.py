"""Progress of a training run, written by rank 0 and printed by whoever watches the run.

Rank 0 (pipeline.train.worker) appends one JSON object per line to ``<run_dir>/progress.jsonl``:
``{"step", "loss", "lr", "images_per_s", "data_wait_fraction", ...}`` every ``train.log_interval`` steps,
``{"step", "eval": {metric: value}}`` after each validation, and ``{"done": true, "step", ...}`` at the end.
`ProgressPrinter` tails that file in a thread of the driver (``kmax train``) or of the sweep driver (one per
trial, whose own output Ray keeps out of the terminal) and prints each line as it arrives.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

PROGRESS_FILE = "progress.jsonl"
POLL_S = 0.5
"""Seconds between two reads of the progress file."""


def format_duration(seconds: float) -> str:
    """``7m05s``; ``?`` for NaN."""
    if seconds != seconds:
        return "?"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class ProgressPrinter(threading.Thread):
    """Prints a run's progress lines (step, loss, img/s, data wait, lr, ETA; validation PQ) while it trains.

    Args:
        path: the run's progress file (it may not exist yet).
        total_steps: the run's ``train.steps`` (for the ETA).
        echo: line printer.
        prefix: put before every line (a sweep names the trial).
        announce_done: also print a line when the run finishes (a sweep trial has no summary of its own).
    Use ``start()``, then ``stop.set()`` and ``join()``: the last lines are printed before it exits.
    """

    def __init__(self, path: Path, total_steps: int, echo, prefix: str = "", announce_done: bool = False):
        super().__init__(daemon=True)
        self.path, self.total, self.echo, self.prefix = Path(path), total_steps, echo, prefix
        self.announce_done = announce_done
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.stop = threading.Event()
        self.t0 = time.time()
        self.first_step: int | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(POLL_S)
        self.poll()

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            message = self.format(json.loads(line))
            if message:
                self.echo(self.prefix + message)

    def format(self, rec: dict) -> str | None:
        step = rec["step"]
        if rec.get("done"):
            return f"finished at step {step}" if self.announce_done else None
        if "eval" in rec:
            e = rec["eval"]
            keys = ("eval/pq_all", "eval/pq_things", "eval/pq_stuff", "eval/miou")  # percent already
            parts = [f"{k.split('/')[-1]} {e[k]:.1f}" for k in keys if e.get(k) is not None]
            return f"validation at step {step}: " + "  ".join(parts)
        if self.first_step is None:
            self.first_step, self.t0 = step, time.time()
        rate = (step - self.first_step) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        wait = 100 * rec["data_wait_fraction"]
        return (
            f"step {step}/{self.total}  loss {rec['loss']:.4f}  img/s {rec['images_per_s']:.1f}  "
            f"data wait {wait:.1f}%  lr {rec['lr']:.2e}  ETA {format_duration(eta)}"
        )
