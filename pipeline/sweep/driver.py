"""`kmax sweep`: an ablation study as a Ray Tune sweep, one Ray Train run per trial, tracked in MLflow.

    kmax sweep --study assignment [--config tiny] [--set train.steps=300 ...] [--seeds N]
               [--run-dir runs/sweeps/assignment] [--tracking-uri URI] [--ray-address auto] [--resume]
               [--asha [--grace-evals 1] [--reduction-factor 2]]

The Train V2 pattern (shared/docs/reference_ray_mlflow.md §2): every Tune trial is a light driver
function that calls `pipeline.train.driver.fit` with the trial's config; fit builds and runs the TorchTrainer.

Sweep directory layout::

    <sweep_dir>/mlflow.db, mlartifacts/        the embedded MLflow store (unless --tracking-uri)
    <sweep_dir>/mlflow_run.json                the parent run of the sweep
    <sweep_dir>/trials/<trial_key>/            one training run directory per trial (fit's layout)
    <sweep_dir>/trials/<trial_key>/trial_done.json   written when the trial finished (resume bookkeeping)
    <sweep_dir>/tune/                          Ray Tune's own experiment state

Trial keys are deterministic (variant name + seed), so ``--resume`` skips every trial whose
``trial_done.json`` exists and re-runs only the missing or failed ones (an interrupted trial resumes from
its latest checkpoint because its run directory is the same). MLflow: one parent run per sweep (tags
``study``, ``sweep``) and one child run per trial (tags ``mlflow.parentRunId``, ``study``, ``trial``,
``variant``, ``seed``, ``overrides``), with the model's parameter count logged as ``model/parameters``.

Early stopping (``--asha``): every validation is also a checkpoint report (``train.checkpoint_interval`` is
set to ``train.eval_interval``), forwarded to Tune by Ray Train's ``TuneReportCallback``, and Tune's
ASHAScheduler stops the trials whose validation PQ falls behind at each rung (``time_attr`` = reports =
validations). A stopped trial is finished, not failed: its MLflow run is closed FINISHED with the tag
``early_stopped=true`` and its ``trial_done.json`` written, so the report shows it and ``--resume`` keeps it.

Concurrency (why trials cannot starve each other): a trial needs ``driver_cpus`` for its Tune driver,
``num_workers * cpus_per_worker`` for its Train workers and ``DATA_CPU_RESERVE`` for the Ray Data read
tasks that feed them. `max_concurrent_trials` = floor(cluster CPUs / that need), at least 1, so every
running trial can always get its workers and its data tasks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.ray_setup import DATA_CPU_RESERVE
from pipeline.sweep.study import SEED_PATH, Study, resolve_study, variant_name
from pipeline.train.progress import PROGRESS_FILE, ProgressPrinter

DRIVER_CPUS = 0.25
"""Logical CPUs reserved for each trial's driver function (it only waits on the TorchTrainer)."""
DONE_FILE = "trial_done.json"
EARLY_STOPPED_TAG = "early_stopped"
PARAMETERS_METRIC = "model/parameters"


def max_concurrent_trials(
    cluster_cpus: float,
    num_workers: int,
    cpus_per_worker: float,
    driver_cpus: float = DRIVER_CPUS,
    data_reserve: float = DATA_CPU_RESERVE,
) -> int:
    """floor(cluster_cpus / (driver_cpus + num_workers * cpus_per_worker + data_reserve)), at least 1.

    Raises ValueError when even one trial cannot fit (it would wait forever for its workers)."""
    need = driver_cpus + num_workers * cpus_per_worker + data_reserve
    if need > cluster_cpus + 1e-9:
        raise ValueError(
            f"one trial needs {need:g} CPUs (driver {driver_cpus:g} + {num_workers} workers x "
            f"{cpus_per_worker:g} + data {data_reserve:g}) but the cluster has {cluster_cpus:g}; lower "
            "scaling.num_workers / scaling.cpus_per_worker or add nodes"
        )
    return max(1, math.floor(cluster_cpus / need + 1e-9))


def trial_key(overrides: dict[str, Any], study: Study) -> str:
    """Deterministic, filesystem-safe directory name of a trial: ``assignment=argmax__seed0``."""
    name = f"{variant_name(overrides, study)}__seed{overrides[SEED_PATH]}"
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", name)


@dataclass
class AshaConfig:
    """ASHA early stopping on validation PQ (Tune's ASHAScheduler, asynchronous successive halving).

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


@dataclass
class SweepSummary:
    sweep_dir: str
    tracking_uri: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)  # trial keys run (and finished) by this call
    skipped: list[str] = field(default_factory=list)  # already finished before this call (resume)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # stopped early by ASHA (also in `finished`)
    wall_s: float = 0.0


def _trial_fn(config: dict[str, Any]) -> None:
    """One Tune trial: the light driver of one Ray Train run (pipeline.train.driver.fit)."""
    from ray import tune

    from kmax_model import build_model
    from pipeline import tracking
    from pipeline.config import load_experiment
    from pipeline.train.driver import fit

    if config.get("inject_failure"):  # deterministic fault hook for the resume test
        raise RuntimeError(f"injected failure in trial {config['key']}")
    trial_dir = Path(config["trial_dir"])
    overrides = [f"{k}={_as_override(v)}" for k, v in config["overrides"].items()]
    overrides += [
        f"run_dir={trial_dir}",
        f"tracking.uri={config['tracking_uri']}",
        f"tracking.experiment_name={config['experiment_name']}",
        f"tracking.run_name={config['key']}",
    ]
    cfg = load_experiment(config["base_config"], config["base_overrides"] + overrides)
    callbacks = None
    if config["asha"]:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    summary = fit(
        cfg,
        echo=lambda s: print(f"[{config['key']}] {s}", flush=True),
        tags=config["tags"],
        callbacks=callbacks,
    )
    params = sum(p.numel() for p in build_model(_bound_model(summary.run_dir)).parameters())
    logger = tracking.RunLogger(summary.tracking_uri, summary.mlflow_run_id)
    logger.log_metrics({PARAMETERS_METRIC: float(params)}, step=0)
    result = {"key": config["key"], "run_id": summary.mlflow_run_id, "metrics": summary.metrics}
    (trial_dir / DONE_FILE).write_text(json.dumps(result, indent=1, default=float))
    tune.report({"pq": float(summary.metrics.get("pq", 0.0)), "step": summary.steps})


def _shared_synthetic(base, out: Path, echo) -> Path:
    from pipeline.data.synthetic import make_prepared_synthetic

    prepared = out / "prepared"
    if not (prepared / base.data.val_split / "manifest.json").is_file():
        echo(f"making the synthetic dataset in {out} ...")
        d = base.data
        make_prepared_synthetic(
            out, train=d.synthetic_train, val=d.synthetic_val, height=d.synthetic_size, width=d.synthetic_size
        )
    return prepared


def _close_stopped_trials(results, tracking_uri: str, echo) -> list[str]:
    """Trials that ended without error and without their done file were stopped by the scheduler: close
    their MLflow runs FINISHED (tag ``early_stopped``) and write their done file with the last metrics."""
    from pipeline import tracking

    stopped = []
    for result in results:
        trial = result.config["trial"]
        trial_dir = Path(trial["trial_dir"])
        if result.error is not None or (trial_dir / DONE_FILE).is_file():
            continue
        run_id = json.loads((trial_dir / tracking.RUN_ID_FILE).read_text())["run_id"]
        logger = tracking.RunLogger(tracking_uri, run_id)
        logger.set_tags({EARLY_STOPPED_TAG: "true"})
        logger.finish("FINISHED")
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        done = {"key": trial["key"], "run_id": run_id, "metrics": metrics, EARLY_STOPPED_TAG: True}
        (trial_dir / DONE_FILE).write_text(json.dumps(done, indent=1, default=float))
        echo(f"[{trial['key']}] stopped early by ASHA at step {metrics.get('step', '?')}")
        stopped.append(trial["key"])
    return stopped


def _trial_entry(config: dict[str, Any]) -> None:
    """Tune passes the grid point as ``config["trial"]``."""
    _trial_fn(config["trial"])


def _bound_model(run_dir: str):
    """The trial's model config as fit resolved it (num_classes bound from the manifest)."""
    from kmax_model.config_utils import load_yaml
    from pipeline.config import ExperimentConfig

    return load_yaml(ExperimentConfig, str(Path(run_dir) / "config.yaml")).model


def _as_override(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def run_sweep(
    study: Study,
    sweep_dir: str | Path,
    base_config: str = "tiny",
    base_overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    ray_address: str | None = None,
    fail_trials: frozenset[str] = frozenset(),
    echo=print,
    asha: AshaConfig | None = None,
) -> SweepSummary:
    """Run (or with ``resume`` continue) ``study``; see the module docstring.

    ``fail_trials``: trial keys whose driver raises before training (a fault hook for tests).
    ``asha``: early stopping on validation PQ (None: every trial runs to the end)."""
    import ray
    from ray import tune

    from pipeline import tracking
    from pipeline.config import load_experiment
    from pipeline.ray_setup import RayConfig, init_ray

    t0 = time.time()
    sweep_dir = Path(sweep_dir).resolve()
    base_overrides = list(base_overrides or [])
    if (sweep_dir / tracking.RUN_ID_FILE).is_file() and not resume:
        raise ValueError(
            f"{sweep_dir} already holds a sweep; pass --resume to continue it or another --run-dir"
        )
    base = load_experiment(base_config, base_overrides)  # validates the base config before any compute
    scheduler = None
    if asha is not None:  # every validation must reach Tune, and only reports do
        scheduler = asha.scheduler(base.train.steps, base.train.eval_interval)
        base_overrides.append(f"train.checkpoint_interval={base.train.eval_interval}")
    for t in study.trials():  # and every trial's overrides
        load_experiment(base_config, base_overrides + [f"{k}={_as_override(v)}" for k, v in t.items()])
    target = tracking.resolve_target(tracking_uri, sweep_dir)
    tracking.check_tracking_uri(target.tracking_uri)
    experiment = f"sweep-{study.name}"
    tracking.get_or_create_experiment(target, experiment)  # artifact location inside the sweep dir
    parent_id, _ = tracking.start_or_resume_run(
        target,
        experiment,
        sweep_dir,
        study.name,
        tags={"study": study.name, "sweep": study.name, "kind": "sweep"},
    )
    parent = tracking.RunLogger(target.tracking_uri, parent_id)
    if not parent.has_params():
        parent.log_params(
            {
                "study": study.name,
                "base_config": base_config,
                "seeds": study.seeds,
                "space": json.dumps(study.space, default=str),
                "base_overrides": json.dumps(base_overrides),
            }
        )

    summary = SweepSummary(str(sweep_dir), target.tracking_uri, parent_id)
    pending = []
    for overrides in study.trials():
        key = trial_key(overrides, study)
        trial_dir = sweep_dir / "trials" / key
        if (trial_dir / DONE_FILE).is_file():
            summary.skipped.append(key)
            continue
        variant = variant_name(overrides, study)
        pending.append(
            {
                "key": key,
                "trial_dir": str(trial_dir),
                "overrides": overrides,
                "base_config": base_config,
                "base_overrides": base_overrides,
                "tracking_uri": target.tracking_uri,
                "experiment_name": experiment,
                "inject_failure": key in fail_trials,
                "asha": asha is not None,
                "tags": {
                    "mlflow.parentRunId": parent_id,
                    "study": study.name,
                    "trial": key,
                    "variant": variant,
                    "seed": str(overrides[SEED_PATH]),
                    "overrides": json.dumps(overrides, default=str),
                },
            }
        )
    if summary.skipped:
        echo(f"resume: {len(summary.skipped)} finished trial(s) kept: {', '.join(summary.skipped)}")
    if pending:
        # A local Ray gets at least the logical CPUs one trial needs (oversubscribing a small machine
        # rather than refusing to run); a cluster is taken as it is.
        need = DRIVER_CPUS + base.scaling.num_workers * base.scaling.cpus_per_worker + DATA_CPU_RESERVE
        local = RayConfig(num_cpus=max(os.cpu_count() or 1, math.ceil(need)))
        init_ray(RayConfig(address=ray_address) if ray_address else local)
        if base.data.prepared_dir is None:  # one synthetic dataset shared by every trial
            prepared = _shared_synthetic(base, sweep_dir / "data", echo)
            for item in pending:
                item["base_overrides"] = item["base_overrides"] + [f"data.prepared_dir={prepared}"]
        cpus = float(ray.cluster_resources().get("CPU", 0))
        sc = base.scaling
        concurrent = max_concurrent_trials(cpus, sc.num_workers, sc.cpus_per_worker)
        echo(f"sweep {study.name}: {len(pending)} trial(s) to run, {concurrent} at a time on {cpus:g} CPUs")
        tuner = tune.Tuner(
            tune.with_resources(_trial_entry, {"CPU": DRIVER_CPUS}),
            param_space={"trial": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrent,
                scheduler=scheduler,
            ),
            run_config=tune.RunConfig(
                name=f"tune_{int(time.time())}",
                storage_path=str(sweep_dir / "tune"),
                verbose=0,  # progress comes from the trials' own progress files (below)
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        printers = [
            ProgressPrinter(
                Path(item["trial_dir"]) / PROGRESS_FILE,
                base.train.steps,
                echo,
                prefix=f"[{item['key']}] ",
                announce_done=True,
            )
            for item in pending
        ]
        for printer in printers:
            printer.start()
        try:
            results = tuner.fit()
        finally:
            for printer in printers:
                printer.stop.set()
                printer.join()
        if asha is not None:
            summary.stopped = _close_stopped_trials(results, target.tracking_uri, echo)
    for item in pending:
        done = (Path(item["trial_dir"]) / DONE_FILE).is_file()
        (summary.finished if done else summary.failed).append(item["key"])
    parent.set_tags(
        {
            "trials_finished": str(len(summary.finished) + len(summary.skipped)),
            "trials_total": str(len(study.trials())),
        }
    )
    parent.finish("FAILED" if summary.failed else "FINISHED")
    summary.wall_s = time.time() - t0
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study name in ablations.studies, or module:function")
    parser.add_argument("--config", default="tiny", help="base experiment preset or YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override applied to every trial (repeatable)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="replicates per variant (default: the study's)"
    )
    parser.add_argument("--data", help="prepared dataset directory (default: synthetic data per trial)")
    parser.add_argument("--run-dir", help="sweep directory (default: runs/sweeps/<study>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite store in the sweep dir)")
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join ('auto' under `ray submit`; default: a local Ray)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep: run only unfinished trials"
    )
    parser.add_argument(
        "--asha", action="store_true", help="stop trials early on validation PQ (Tune ASHA scheduler)"
    )
    parser.add_argument("--grace-evals", type=int, default=1, help="ASHA: validations before any stop")
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the best 1/this per rung")


def run(args: argparse.Namespace) -> int:
    import os

    from pipeline.tracking import TrackingError

    address = args.ray_address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    overrides = list(args.overrides) + ([f"data.prepared_dir={args.data}"] if args.data else [])
    try:
        study = resolve_study(args.study, seeds=args.seeds)
        asha = AshaConfig(args.grace_evals, args.reduction_factor) if args.asha else None
        sweep_dir = args.run_dir or f"runs/sweeps/{study.name}"
        s = run_sweep(
            study,
            sweep_dir,
            args.config,
            overrides,
            args.tracking_uri,
            args.resume,
            address,
            echo=lambda m: print(m, flush=True),
            asha=asha,
        )
    except (ValueError, FileNotFoundError, TrackingError) as exc:
        print(f"kmax sweep: {exc}", file=sys.stderr)
        return 2
    print(
        f"sweep {study.name}: {len(s.finished)} trial(s) run ({len(s.stopped)} stopped early), "
        f"{len(s.skipped)} kept, {len(s.failed)} failed "
        f"in {s.wall_s / 60:.1f} min\n  MLflow: {s.tracking_uri} parent run {s.parent_run_id}\n"
        f"  compare: kmax compare --sweep {study.name} --run-dir {s.sweep_dir}"
    )
    if s.failed:
        print(f"failed trials: {', '.join(s.failed)}; rerun with --resume", file=sys.stderr)
        return 1
    return 0
