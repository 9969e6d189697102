"""One trial of a sweep: its typed config, built once on the driver, and the Tune function that trains it.

Tune's param space holds the study's dotted config paths, so Tune's own results show the dimensions; the
trial function finds its `TrialSpec` by the trial key of the values Tune gives it, checks that they are the
spec's, and calls `pipeline.train.driver.fit` with the spec's config (the light-driver pattern of Train V2,
shared/docs/reference_ray_mlflow.md §2). A finished trial leaves ``trial_done.json`` in its run directory:
``--resume`` keeps it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
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
    def location(self) -> str:
        """Where the trial's persistent state lives (its run location, pipeline.config)."""
        return self.cfg.run_location

    def done(self) -> bool:
        return storage.is_file(storage.join(self.location, DONE_FILE))

    def mark_done(self, record: dict) -> None:
        storage.write_text(
            storage.join(self.location, DONE_FILE), json.dumps(record, indent=1, default=float)
        )


@dataclass
class TrialBook:
    """What every trial function gets (through ``tune.with_parameters``): the specs by key, and how to run
    them: the resolved tracking target, whether ASHA listens, the workers' step hooks, the sweep's
    channel for the lines the trials print (a RunChannel actor: the sweep driver prints them), and the
    driver's MLflow credentials (pipeline.tracking.credential_env): a trial on a node of a cluster runs
    in that node's environment, not the driver's, and logs to the server as the driver's user."""

    study: Study
    specs: dict[str, TrialSpec]
    tracking: Any
    asha: bool = False
    hooks: Sequence = field(default_factory=tuple)
    lines: Any = None
    credentials: dict[str, str] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (Tune may hand a tuple value back as a list)."""
    return list(value) if isinstance(value, (list, tuple)) else value


def run_trial(config: dict[str, Any], book: TrialBook) -> None:
    """The Tune trainable: train the trial of ``config`` (Tune's dotted values), record it, report PQ."""
    from ray import tune

    from kmax_model import build_model
    from pipeline import tracking
    from pipeline.train.driver import fit

    os.environ.update(book.credentials)  # this actor's process only: MLflow's client reads them per call
    spec = book.specs[trial_key(config, book.study)]
    if any(_plain(config[path]) != _plain(value) for path, value in spec.point.items()):
        raise ValueError(f"trial {spec.key}: Tune gave {config}, the sweep planned {spec.point}")
    callbacks = None
    if book.asha:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]

    def echo(line: str) -> None:
        book.lines.put.remote([{"text": f"[{spec.key}] {line}"}])

    summary = fit(
        spec.cfg, echo=echo, tags=spec.tags, callbacks=callbacks, hooks=book.hooks, tracking=book.tracking
    )
    echo(f"finished at step {summary.steps}: PQ {summary.metrics.get('pq', float('nan')):.2f}")
    params = sum(p.numel() for p in build_model(summary.config.model).parameters())
    logger = tracking.RunLogger(summary.tracking_uri, summary.mlflow_run_id)
    logger.log_metrics({PARAMETERS_METRIC: float(params)}, step=0)
    spec.mark_done({"key": spec.key, "run_id": summary.mlflow_run_id, "metrics": summary.metrics})
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
        run_id = tracking.read_run_record(spec.location)["run_id"]
        logger = tracking.RunLogger(book.tracking.tracking_uri, run_id)
        logger.set_tags({EARLY_STOPPED_TAG: "true"})
        logger.finish("FINISHED")
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        spec.mark_done({"key": spec.key, "run_id": run_id, "metrics": metrics, EARLY_STOPPED_TAG: True})
        echo(f"[{spec.key}] stopped early by ASHA at step {metrics.get('step', '?')}")
        stopped.append(spec.key)
    return stopped
