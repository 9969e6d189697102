"""Early stopping of sweep trials on validation PQ: Tune's ASHAScheduler (asynchronous successive halving).

Every validation of a trial must reach Tune, and only checkpoint reports do: the sweep sets
``train.checkpoint_interval`` to ``train.eval_interval`` and forwards each report with Ray Train's
``TuneReportCallback``; ``time_attr`` then counts validations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AshaConfig:
    """ASHA's rungs.

    Attributes:
        grace_evals: validations every trial gets before it can be stopped.
        reduction_factor: at each rung only the best 1/reduction_factor of the trials go on.
    """

    grace_evals: int = 1
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        if self.grace_evals < 1:
            raise ValueError(f"asha.grace_evals must be >= 1, got {self.grace_evals}")
        if self.reduction_factor < 2:
            raise ValueError(f"asha.reduction_factor must be >= 2, got {self.reduction_factor}")

    def scheduler(self, steps: int, eval_interval: int):
        """The scheduler for trials of ``steps`` steps validated every ``eval_interval`` steps."""
        from ray.tune.schedulers import ASHAScheduler

        if eval_interval <= 0:
            raise ValueError("--asha needs periodic validation: set train.eval_interval > 0")
        reports = math.ceil(steps / eval_interval) + 1  # + the trial function's final report
        return ASHAScheduler(
            time_attr="training_iteration",
            metric="pq",
            mode="max",
            max_t=reports,
            grace_period=min(self.grace_evals, reports),
            reduction_factor=self.reduction_factor,
        )
