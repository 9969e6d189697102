"""One small real sweep shared by test_sweep.py, test_report.py and test_dashboard_browser.py.

The sweep is built once per test session (module-level cache: Python imports this module once): a
2-variant study (argmax vs cluster_softmax) of 6 training steps on 48 px synthetic data, where the
cluster_softmax trial fails at its first step through a step hook (tests/fault_hooks.py), then
``resume=True`` (without the hook) runs only it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExperimentConfig, load_experiment
from pipeline.sweep.driver import SweepSummary, run_sweep
from pipeline.sweep.study import Study
from pipeline.sweep.trial import DONE_FILE
from tests import fault_hooks

STUDY = Study("t_assign", {"model.decoder.assignment": ["argmax", "cluster_softmax"]})
KEPT = "assignment=argmax__seed0"
FAILED_ONCE = "assignment=cluster_softmax__seed0"
STEPS = 6
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.warmup_steps=1",
    "train.eval_interval=3",
    "train.checkpoint_interval=6",
    "train.vis_interval=6",
    "train.log_interval=2",
    "train.num_to_keep=1",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_vis_images=2",
    "data.augment.crop_size=49",
    "scaling.num_workers=1",
    "scaling.cpus_per_worker=0.5",
    "fault.max_failures=0",
]


@dataclass
class SharedSweep:
    sweep_dir: Path
    base: ExperimentConfig
    first: SweepSummary
    resumed: SweepSummary
    kept_before: dict  # the kept trial's done record and file times, taken between the two calls


_CACHE: dict[str, SharedSweep] = {}


def shared_sweep(tmp_path_factory) -> SharedSweep:
    if "sweep" not in _CACHE:
        from pipeline.data.synthetic import make_prepared_synthetic

        root = tmp_path_factory.mktemp("shared_sweep")
        data = make_prepared_synthetic(root / "data", train=8, val=4, height=48, width=48, seed=0)
        sweep_dir = root / "sweep"
        base = load_experiment("tiny", [f"data.prepared_dir={data}", *OVERRIDES])
        fault_hooks.by_value()
        fail = fault_hooks.FailRun(FAILED_ONCE, str(root / "failed.marker"))
        first = run_sweep(STUDY, sweep_dir, base, hooks=[fail])
        kept_dir = sweep_dir / "trials" / KEPT
        kept_before = {
            "record": json.loads((kept_dir / DONE_FILE).read_text()),
            "mtimes": {str(p): p.stat().st_mtime_ns for p in kept_dir.rglob("*") if p.is_file()},
        }
        resumed = run_sweep(STUDY, sweep_dir, base, resume=True)
        _CACHE["sweep"] = SharedSweep(sweep_dir, base, first, resumed, kept_before)
    return _CACHE["sweep"]
