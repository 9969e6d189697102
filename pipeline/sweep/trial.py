"""One trial of a sweep: its typed config, built once on the driver, and the Tune function that trains it.

Tune's param space holds the study's dotted config paths, so Tune's own results show the dimensions; the
trial function finds its `TrialSpec` by the trial key of the values Tune gives it, checks that they are the
spec's, and calls `pipeline.train.driver.fit` with the spec's config (the light-driver pattern of Train V2,
shared/docs/reference_ray_mlflow.md §2). A finished trial leaves ``trial_done.json`` in its run directory:
``--resume`` keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.sweep.study import Study, trial_key

DONE_FILE = "trial_done.json"
EARLY_STOPPED_TAG = "early_stopped"
PARAMETERS_METRIC = "model/parameters"


@dataclass
class TrialSpec:
    """One (variant, seed) of a study: ``point`` maps dotted paths to values, ``cfg`` is the base config
    with the study's fixed overrides, the point, the run directory and the tracking fields applied once."""

    key: str
    point: dict[str, Any]
    cfg: ExperimentConfig
    tags: dict[str, str]

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def done(self) -> bool:
        return (self.run_dir / DONE_FILE).is_file()


@dataclass
class TrialBook:
    """What every trial function gets (through ``tune.with_parameters``): the specs by key, and how to run
    them: the resolved tracking target, whether ASHA listens, the workers' step hooks."""

    study: Study
    specs: dict[str, TrialSpec]
    tracking: Any
    asha: bool = False
    hooks: Sequence = field(default_factory=tuple)


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (Tune may hand a tuple value back as a list)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def run_trial(config: dict[str, Any], book: TrialBook) -> None:
    """The Tune trainable: train the trial of ``config`` (Tune's dotted values), record it, report PQ."""
    from ray import tune

    from kmax_model import build_model
    from pipeline import tracking
    from pipeline.train.driver import fit

    spec = book.specs[trial_key(config, book.study)]
    if any(_plain(config[path]) != _plain(value) for path, value in spec.point.items()):
        raise ValueError(f"trial {spec.key}: Tune gave {config}, the sweep planned {spec.point}")
    callbacks = None
    if book.asha:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    echo = lambda s: print(f"[{spec.key}] {s}", flush=True)  # noqa: E731
    summary = fit(
        spec.cfg, echo=echo, tags=spec.tags, callbacks=callbacks, hooks=book.hooks, tracking=book.tracking
    )
    params = sum(p.numel() for p in build_model(summary.config.model).parameters())
    logger = tracking.RunLogger(summary.tracking_uri, summary.mlflow_run_id)
    logger.log_metrics({PARAMETERS_METRIC: float(params)}, step=0)
    record = {"key": spec.key, "run_id": summary.mlflow_run_id, "metrics": summary.metrics}
    (spec.run_dir / DONE_FILE).write_text(json.dumps(record, indent=1, default=float))
    tune.report({"pq": float(summary.metrics.get("pq", 0.0)), "step": summary.steps})


def close_stopped_trials(results, book: TrialBook, echo) -> list[str]:
    """Trials that ended without error and without their done file were stopped by the scheduler: close
    their MLflow runs FINISHED (tag ``early_stopped``) and write their done file with the last metrics."""
    from pipeline import tracking

    stopped = []
    for result in results:
        spec = book.specs[trial_key(result.config, book.study)]
        if result.error is not None or spec.done():
            continue
        run_id = json.loads((spec.run_dir / tracking.RUN_ID_FILE).read_text())["run_id"]
        logger = tracking.RunLogger(book.tracking.tracking_uri, run_id)
        logger.set_tags({EARLY_STOPPED_TAG: "true"})
        logger.finish("FINISHED")
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        done = {"key": spec.key, "run_id": run_id, "metrics": metrics, EARLY_STOPPED_TAG: True}
        (spec.run_dir / DONE_FILE).write_text(json.dumps(done, indent=1, default=float))
        echo(f"[{spec.key}] stopped early by ASHA at step {metrics.get('step', '?')}")
        stopped.append(spec.key)
    return stopped
