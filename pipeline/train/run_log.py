"""What rank 0 of a training run writes while it trains: MLflow metrics and artifacts, and progress lines.

MLflow: per-step metrics go through a `pipeline.tracking.BackgroundMetrics` thread (a store write never
blocks the step), validation metrics and figures through a `RunLogger`, both on the run the driver created.
Progress: one JSON object per line appended to ``<run_dir>/progress.jsonl`` (pipeline.train.progress prints
them on the driver). On other ranks every method does nothing, so the loop calls them unconditionally.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

AUX_MARK = "_aux"
"""Loss keys of the per-decoder-layer outputs contain this (kmax_model.criterion: ``loss_pq_dice_aux0``)."""


class RunLog:
    """Rank 0's MLflow run and progress file; a no-op on other ranks.

    Args:
        tracking_uri, run_id: the MLflow run (created by the driver).
        progress_file: the run's progress file.
        log_interval: every step logs the total, each final-layer loss, lr and throughput; the per-layer
            (``_aux``) terms, 30 of the tiny model's 45 series, and a progress line every this many steps.
        active: False on ranks other than 0.
    """

    def __init__(self, tracking_uri: str, run_id: str, progress_file: str, log_interval: int, active: bool):
        self.active, self.log_interval = active, log_interval
        if not active:
            return
        from pipeline.tracking import BackgroundMetrics, RunLogger

        self.logger = RunLogger(tracking_uri, run_id)
        self.step_metrics = BackgroundMetrics(RunLogger(tracking_uri, run_id))
        self.progress = Path(progress_file)

    def start(self, params: dict[str, str], config: dict[str, Any]) -> None:
        """Log the run's parameters and config once (a resumed run already has them)."""
        if self.active and not self.logger.has_params():
            self.logger.log_params(params)
            self.logger.log_dict(config, "config.json")

    def step(self, step: int, metrics: dict[str, float], final: bool) -> None:
        if not self.active:
            return
        full = final or step % self.log_interval == 0
        self.step_metrics.log_metrics(
            {f"train/{k}": v for k, v in metrics.items() if full or AUX_MARK not in k}, step
        )
        if full:
            self._line({"step": step, **metrics})

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.active:
            self.logger.log_metrics(metrics, step)
            self._line({"step": step, "eval": metrics})

    def figure(self, figure, artifact_file: str) -> None:
        """Log a matplotlib figure as an artifact, then close it."""
        from pipeline.eval.visualize import close

        if self.active:
            self.logger.log_figure(figure, artifact_file)
        close(figure)

    def best(self, path: Path, step: int, pq: float) -> None:
        """Record where the best-PQ checkpoint was copied (artifact ``best_checkpoint.json``)."""
        if self.active:
            self.logger.log_dict({"path": str(path), "step": step, "pq": pq}, "best_checkpoint.json")

    def flush(self) -> None:
        """Block until every queued metric is in the store (before a checkpoint: nothing lost on resume)."""
        if self.active:
            self.step_metrics.flush()

    def close(self, step: int, last_eval: dict[str, float]) -> None:
        if self.active:
            self.step_metrics.close()
            self._line({"done": True, "step": step, **last_eval})

    def _line(self, record: dict) -> None:
        with self.progress.open("a") as f:
            f.write(json.dumps(record) + "\n")
