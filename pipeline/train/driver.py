"""`kmax train`: the Ray Train driver that builds the TorchTrainer, and its command line.

    kmax train --config tiny --set train.steps=300 [--data PREPARED_DIR] [--run-dir DIR]
               [--tracking-uri URI] [--num-workers N] [--gpu]

`fit(cfg)` does, in order: make every path absolute; check the tracking store (an unreachable MLflow server
fails here); with a prepared dataset, read and check its manifests, bind its classes and refuse an
incompatible checkpoint already in the run directory, all before Ray starts; start or join Ray; make the
synthetic dataset when no ``data.prepared_dir`` is given; create or resume the MLflow run (its id lives in
``<run_dir>/mlflow_run.json`` and in every checkpoint); run a TorchTrainer over
pipeline.train.worker.train_fn_per_worker.

Run directory layout::

    <run_dir>/config.yaml                 the resolved ExperimentConfig
    <run_dir>/mlflow.db, mlartifacts/     the embedded MLflow store (when no tracking URI is given)
    <run_dir>/ray_results/train/checkpoint_XXXXXXX/state.pt   the N most recent checkpoints (Ray Train)
    <run_dir>/best/state.pt               the checkpoint with the best validation PQ
    <run_dir>/progress.jsonl              rank 0's progress lines (the driver prints them)
    <run_dir>/data/prepared               the synthetic dataset, when none was given

Running ``kmax train`` again with the same run directory resumes from the latest checkpoint and continues
the same MLflow run (Ray Train job-level resume: same RunConfig name and storage path).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, bind_manifest, load_experiment, with_absolute_paths, with_fields
from pipeline.train.progress import PROGRESS_FILE, ProgressPrinter

RAY_RUN_NAME = "train"
"""Ray Train run name inside ``<run_dir>/ray_results``; fixed so that a rerun resumes (no timestamps)."""


@dataclass
class TrainSummary:
    """What `fit` ran and where it left things; ``config`` is the bound config the workers trained."""

    config: ExperimentConfig
    steps: int
    checkpoint: str | None
    best_checkpoint: str | None
    tracking_uri: str
    mlflow_run_id: str
    metrics: dict[str, Any]
    wall_s: float

    @property
    def run_dir(self) -> str:
        return self.config.run_dir


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "ray_results" / RAY_RUN_NAME


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``state.pt`` under the run's Ray storage (highest step), or None."""
    files = sorted(checkpoint_root(run_dir).glob("checkpoint_*/state.pt"))
    return files[-1] if files else None


def bind_data(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check the prepared splits (no Ray): both manifests readable, the same categories, a batch for every
    worker; bind num_classes and the thing classes. Errors name the file or the config field."""
    from pipeline.data.records import read_manifest

    data = cfg.data
    train = read_manifest(data.prepared_dir, data.train_split)
    val = read_manifest(data.prepared_dir, data.val_split)
    if train["categories"] != val["categories"]:
        raise ValueError(
            f"data.train_split={data.train_split!r} and data.val_split={data.val_split!r} of "
            f"{data.prepared_dir} have different categories"
        )
    per_worker = int(train["num_records"]) // cfg.scaling.num_workers
    if per_worker < data.batch_size:
        raise ValueError(
            f"data.batch_size={data.batch_size} exceeds the {per_worker} training images of each of "
            f"scaling.num_workers={cfg.scaling.num_workers} workers ({data.prepared_dir}/{data.train_split})"
        )
    return bind_manifest(cfg, train)


def refuse_incompatible_resume(cfg: ExperimentConfig, echo) -> None:
    """A checkpoint in the run directory trained under another config is refused (before any compute)."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.train.resume import check_compatible

    previous = latest_checkpoint(cfg.run_dir)
    if previous is not None:
        saved = load_checkpoint(previous)["config"]
        check_compatible(saved, cfg.to_dict(), previous.parent, ExperimentConfig().to_dict())
        echo(f"resuming from {previous.parent}")


def prepare_run(cfg: ExperimentConfig, tracking=None, echo=print):
    """Everything before the trainer: absolute paths, tracking, data, Ray. Returns (bound cfg, target)."""
    from pipeline import tracking as mlflow_tracking
    from pipeline.ray_setup import init_ray, run_cpu_need, with_local_cpus

    cfg = with_absolute_paths(cfg)
    target = tracking or mlflow_tracking.resolve_target(cfg.tracking.uri, cfg.run_dir)
    if tracking is None:
        mlflow_tracking.check_tracking_uri(target.tracking_uri)
    if cfg.data.prepared_dir is not None:  # everything the driver can check, before Ray starts
        cfg = bind_data(cfg)
        refuse_incompatible_resume(cfg, echo)
    sc = cfg.scaling
    init_ray(with_local_cpus(cfg.ray, run_cpu_need(sc.num_workers, sc.cpus_per_worker)))
    if cfg.data.prepared_dir is None:
        from pipeline.data.synthetic import ensure_synthetic

        prepared = ensure_synthetic(Path(cfg.run_dir) / "data", cfg.data, echo)
        cfg = bind_data(with_fields(cfg, {"data.prepared_dir": str(prepared)}))
        refuse_incompatible_resume(cfg, echo)
    return cfg, target


def fit(
    cfg: ExperimentConfig,
    *,
    echo=print,
    tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    hooks: Sequence = (),
    tracking=None,
) -> TrainSummary:
    """Train (or resume) the run described by ``cfg``; see the module docstring.

    ``tags`` are added to the MLflow run when it is created (a sweep passes ``mlflow.parentRunId``, study,
    trial and variant). ``callbacks``: Ray Train user callbacks of the run (a sweep with early stopping
    passes ``TuneReportCallback`` so that every checkpoint report, with its validation PQ, reaches Tune).
    ``hooks``: step hooks run in every worker (pipeline.train.worker.StepHook). ``tracking``: an already
    resolved and checked `pipeline.tracking.TrackingTarget` (a sweep's), else the config's is resolved."""
    from kmax_model.config_utils import save_yaml
    from pipeline import tracking as mlflow_tracking
    from pipeline.data.records import training_dataset
    from pipeline.train.worker import WorkerRun

    t_start = time.time()
    cfg, target = prepare_run(cfg, tracking, echo)
    run_dir = Path(cfg.run_dir)
    save_yaml(cfg, run_dir / "config.yaml")
    run_name = cfg.tracking.run_name or run_dir.name
    run_id, _ = mlflow_tracking.start_or_resume_run(
        target,
        cfg.tracking.experiment_name,
        run_dir,
        run_name,
        tags={**(tags or {}), "run_dir": str(run_dir)},
    )
    train_ds, train_rows, passes = training_dataset(
        cfg.data.prepared_dir, cfg.data.train_split, cfg.data.min_epoch_rows
    )
    progress = str(run_dir / PROGRESS_FILE)
    run = WorkerRun(cfg, target.tracking_uri, run_id, progress, train_rows, passes, tuple(hooks))
    result = _run_trainer(cfg, run, train_ds, callbacks or [], echo)
    final = result.checkpoint.path if result.checkpoint else None
    best = run_dir / "best" / "state.pt"
    best_path = str(best) if best.exists() else None
    logger = mlflow_tracking.RunLogger(target.tracking_uri, run_id)
    logger.log_dict({"latest": final, "best": best_path}, "checkpoints.json")
    logger.finish()
    metrics = dict(result.metrics or {})
    steps = int(metrics.get("step", 0))
    return TrainSummary(
        cfg, steps, final, best_path, target.tracking_uri, run_id, metrics, time.time() - t_start
    )


def _run_trainer(cfg: ExperimentConfig, run, train_ds, callbacks: list, echo):
    """Fit the TorchTrainer while a thread prints the progress lines; a failed run's MLflow run is FAILED."""
    from pipeline.tracking import RunLogger

    trainer = _build_trainer(cfg, run, train_ds, callbacks)
    printer = ProgressPrinter(Path(run.progress_file), cfg.train.steps, echo)
    printer.start()
    try:
        return trainer.fit()
    except BaseException:
        RunLogger(run.tracking_uri, run.mlflow_run_id).finish("FAILED")
        raise
    finally:
        printer.stop.set()
        printer.join()


def _build_trainer(cfg: ExperimentConfig, run, train_ds, callbacks: list):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.worker import train_fn_per_worker

    sc = cfg.scaling
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"run": run},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=sc.resources_per_worker(),
            placement_strategy=sc.placement_strategy,
        ),
        datasets={"train": train_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(Path(cfg.run_dir) / "ray_results"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep,
                checkpoint_score_attribute="step",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.fault.max_failures),
            callbacks=callbacks,
        ),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_config_arguments, add_run_arguments

    add_config_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument("--num-workers", type=int, help="Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The typed config: preset or YAML, then ``--set`` overrides, then the flags set their fields."""
    from pipeline.cli import run_fields

    fields = run_fields(args)
    if args.num_workers is not None:
        fields["scaling.num_workers"] = args.num_workers
    if args.gpu:
        fields["scaling.use_gpu"] = True
    return with_fields(load_experiment(args.config, args.overrides), fields)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import fail
    from pipeline.tracking import TrackingError

    try:
        summary = fit(config_from_args(args), echo=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError, TrackingError) as exc:  # IncompatibleCheckpointError included
        return fail("train", exc)
    m = summary.metrics
    print(
        f"done: {summary.steps} steps in {summary.wall_s / 60:.1f} min; "
        f"final PQ {m.get('pq', float('nan')):.2f} (best {m.get('best_pq', float('nan')):.2f})\n"
        f"  latest checkpoint: {summary.checkpoint}\n  best checkpoint:   {summary.best_checkpoint}\n"
        f"  MLflow: {summary.tracking_uri} run {summary.mlflow_run_id}"
    )
    return 0
