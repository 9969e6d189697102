"""Faults injected into real training runs through the workers' step hooks (pipeline.train.worker.StepHook).

Production code has no fault switch: a test passes one of these callables to ``fit(cfg, hooks=[...])`` or
``run_sweep(..., hooks=[...])``. They are pickled by value (`by_value`), because the Ray workers that run
them cannot import the tests package.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def by_value() -> None:
    """Ship this module's hooks to Ray workers by value (call before passing a hook to a run)."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class KillWorker:
    """The worker of ``rank`` dies without cleanup (``os._exit(1)``) after finishing ``step``, once: the
    ``marker`` file records it and keeps the restarted worker alive. ``delay_s`` lets the Ray Train
    controller register the step's report first (its health check polls every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, reference_ray_mlflow.md §1)."""

    step: int
    rank: int
    marker: str
    delay_s: float = 0.0

    def __call__(self, *, step: int, rank: int, run_dir: str) -> None:
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed rank {rank} at step {step}\n")
            time.sleep(self.delay_s)
            os._exit(1)


@dataclass(frozen=True)
class FailRun:
    """The run whose directory is named ``run_name`` raises at its first step, once per ``marker`` (a sweep
    trial that fails, then succeeds when the sweep is resumed without the hook)."""

    run_name: str
    marker: str

    def __call__(self, *, step: int, rank: int, run_dir: str) -> None:
        if Path(run_dir).name == self.run_name and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"failed {self.run_name} at step {step}\n")
            raise RuntimeError(f"injected failure in {self.run_name} at step {step}")
