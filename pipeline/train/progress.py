"""Progress lines of a training run: what the driver prints while it trains.

Rank 0 (pipeline.train.run_log) reports one record per ``train.log_interval`` steps (``{"step", "loss",
"lr", "images_per_s", "data_wait_fraction", ...}``), ``{"step", "eval": {metric: value}}`` after each
validation, ``{"warning": text}`` for the user and ``{"done": true, "step", ...}`` at the end. The driver
(pipeline.train.forwarder) appends each record to ``<run_dir>/progress.jsonl`` on its own disk and prints it
through `ProgressLines`.
"""

from __future__ import annotations

import time

PROGRESS_FILE = "progress.jsonl"


def format_duration(seconds: float) -> str:
    """``7m05s``; ``?`` for NaN."""
    if seconds != seconds:
        return "?"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class ProgressLines:
    """Formats progress records (step, loss, img/s, data wait, lr, ETA; validation PQ; warnings).

    Args:
        total_steps: the run's ``train.steps`` (for the ETA).
        announce_done: also a line when the run finishes (a sweep trial has no summary of its own).
    """

    def __init__(self, total_steps: int, announce_done: bool = False):
        self.total, self.announce_done = total_steps, announce_done
        self.t0 = time.time()
        self.first_step: int | None = None

    def format(self, rec: dict) -> str | None:
        """The line of a record, or None when it prints nothing."""
        if "warning" in rec:
            return f"warning: {rec['warning']}"
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
