"""`kmax train`: the Ray Train driver that builds the TorchTrainer, and its command line.

    kmax train --config tiny --set train.steps=300 [--data PREPARED_DIR] [--run-dir DIR]
               [--tracking-uri URI] [--num-workers N] [--gpu]

`fit(cfg)` does, in order: check the tracking store (an unreachable MLflow server fails here, before any
compute), refuse an incompatible existing checkpoint in the run directory, make the synthetic dataset when
no ``data.prepared_dir`` is given, bind the class metadata of the prepared manifest, create or resume the
MLflow run (its id lives in ``<run_dir>/mlflow_run.json`` and in every checkpoint), start Ray quietly and
run a TorchTrainer over pipeline.train.worker.train_fn_per_worker.

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
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, bind_manifest, load_experiment
from pipeline.ray_setup import DATA_CPU_RESERVE
from pipeline.train.progress import PROGRESS_FILE, ProgressPrinter

RAY_RUN_NAME = "train"
"""Ray Train run name inside ``<run_dir>/ray_results``; fixed so that a rerun resumes (no timestamps)."""


@dataclass
class TrainSummary:
    run_dir: str
    steps: int
    checkpoint: str | None
    best_checkpoint: str | None
    tracking_uri: str
    mlflow_run_id: str
    metrics: dict[str, Any]
    wall_s: float


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "ray_results" / RAY_RUN_NAME


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``state.pt`` under the run's Ray storage (highest step), or None."""
    files = sorted(checkpoint_root(run_dir).glob("checkpoint_*/state.pt"))
    return files[-1] if files else None


def prepare_data(cfg: ExperimentConfig) -> ExperimentConfig:
    """Make the synthetic dataset when none is given; bind num_classes / thing classes from the manifest."""
    from pipeline.data.records import read_manifest

    data = cfg.data
    if data.prepared_dir is None:
        out = Path(cfg.run_dir).resolve() / "data"
        prepared = out / "prepared"
        if not (prepared / data.val_split / "manifest.json").is_file():
            from pipeline.data.synthetic import make_prepared_synthetic

            print(f"making the synthetic dataset in {out} ...", flush=True)
            make_prepared_synthetic(
                out,
                train=data.synthetic_train,
                val=data.synthetic_val,
                height=data.synthetic_size,
                width=data.synthetic_size,
                seed=cfg.train.seed,
            )
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(data, prepared_dir=str(prepared)))
    train = read_manifest(cfg.data.prepared_dir, cfg.data.train_split)
    val = read_manifest(cfg.data.prepared_dir, cfg.data.val_split)
    if train["categories"] != val["categories"]:
        raise ValueError(
            f"data.train_split={cfg.data.train_split!r} and data.val_split={cfg.data.val_split!r} of "
            f"{cfg.data.prepared_dir} have different categories"
        )
    return bind_manifest(cfg, train)


def _local_ray_cpus(cfg: ExperimentConfig) -> int:
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + DATA_CPU_RESERVE
    return max(os.cpu_count() or 1, math.ceil(need))


def fit(
    cfg: ExperimentConfig,
    fault_injection: dict | None = None,
    echo=print,
    tags: dict[str, str] | None = None,
    callbacks: list | None = None,
) -> TrainSummary:
    """Train (or resume) the run described by ``cfg``; see the module docstring.

    ``tags`` are added to the MLflow run when it is created (a sweep passes ``mlflow.parentRunId``, study,
    trial and variant). ``callbacks``: Ray Train user callbacks of the run (a sweep with early stopping
    passes ``TuneReportCallback`` so that every checkpoint report, with its validation PQ, reaches Tune)."""
    from pipeline import tracking
    from pipeline.ray_setup import init_ray
    from pipeline.train import checkpoint as ckpt

    t_start = time.time()
    run_dir = Path(cfg.run_dir).resolve()
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    target = tracking.resolve_target(cfg.tracking.uri, run_dir)
    tracking.check_tracking_uri(target.tracking_uri)

    ray_cfg = cfg.ray
    if ray_cfg.address in (None, "local") and ray_cfg.num_cpus is None:
        ray_cfg = dataclasses.replace(ray_cfg, num_cpus=_local_ray_cpus(cfg))
    init_ray(ray_cfg)
    cfg = prepare_data(cfg)
    experiment = cfg.to_dict()
    previous = latest_checkpoint(run_dir)
    if previous is not None:  # refuse before spending compute on workers
        saved = ckpt.load_checkpoint(previous)["config"]
        ckpt.check_compatible(saved, experiment, previous.parent, ExperimentConfig().to_dict())
        echo(f"resuming from {previous.parent}")

    from kmax_model.config_utils import save_yaml

    save_yaml(cfg, run_dir / "config.yaml")
    run_name = cfg.tracking.run_name or run_dir.name
    run_id, resumed = tracking.start_or_resume_run(
        target,
        cfg.tracking.experiment_name,
        run_dir,
        run_name,
        tags={**(tags or {}), "run_dir": str(run_dir)},
    )
    from pipeline.data.records import training_dataset

    train_ds, train_rows, passes = training_dataset(
        cfg.data.prepared_dir, cfg.data.train_split, cfg.data.min_epoch_rows
    )
    loop_config = {
        "experiment": experiment,
        "tracking_uri": target.tracking_uri,
        "mlflow_run_id": run_id,
        "progress_file": str(run_dir / PROGRESS_FILE),
        "train_rows": train_rows,
        "passes": passes,
        "val_dir": cfg.data.prepared_dir,
        "fault_injection": fault_injection,
    }
    trainer = _build_trainer(cfg, loop_config, train_ds, callbacks or [])
    printer = ProgressPrinter(run_dir / PROGRESS_FILE, cfg.train.steps, echo)
    printer.start()
    logger = tracking.RunLogger(target.tracking_uri, run_id)
    try:
        result = trainer.fit()
    except BaseException:
        logger.finish("FAILED")
        raise
    finally:
        printer.stop.set()
        printer.join()
    final = result.checkpoint.path if result.checkpoint else None
    best = run_dir / "best" / ckpt.CHECKPOINT_FILE
    logger.log_dict({"latest": final, "best": str(best) if best.exists() else None}, "checkpoints.json")
    logger.finish()
    return TrainSummary(
        run_dir=str(run_dir),
        steps=int((result.metrics or {}).get("step", 0)),
        checkpoint=final,
        best_checkpoint=str(best) if best.exists() else None,
        tracking_uri=target.tracking_uri,
        mlflow_run_id=run_id,
        metrics=dict(result.metrics or {}),
        wall_s=time.time() - t_start,
    )


def _build_trainer(cfg: ExperimentConfig, loop_config: dict, train_ds, callbacks: list):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.worker import train_fn_per_worker

    sc = cfg.scaling
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
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
    parser.add_argument(
        "--config", default="tiny", help="experiment preset name (tiny, resnet50_coco, ...) or YAML file"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, e.g. train.lr=1e-3 (repeatable)",
    )
    parser.add_argument(
        "--data", help="prepared dataset directory (default: the synthetic dataset in the run dir)"
    )
    parser.add_argument("--run-dir", help="run directory (default: runs/train); rerun the same one to resume")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite store in the run dir)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="train on GPUs (one per worker)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.prepared_dir={args.data}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.num_workers is not None:
        overrides.append(f"scaling.num_workers={args.num_workers}")
    if args.gpu:
        overrides.append("scaling.use_gpu=true")
    return load_experiment(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from pipeline.tracking import TrackingError
    from pipeline.train.checkpoint import IncompatibleCheckpointError

    try:
        cfg = config_from_args(args)
        summary = fit(cfg, echo=lambda s: print(s, flush=True))
    except (ValueError, FileNotFoundError, TrackingError, IncompatibleCheckpointError) as exc:
        print(f"kmax train: {exc}", file=sys.stderr)
        return 2
    m = summary.metrics
    print(
        f"done: {summary.steps} steps in {summary.wall_s / 60:.1f} min; "
        f"final PQ {m.get('pq', float('nan')):.2f} "
        f"(best {m.get('best_pq', float('nan')):.2f})\n"
        f"  latest checkpoint: {summary.checkpoint}\n  best checkpoint:   {summary.best_checkpoint}\n"
        f"  MLflow: {summary.tracking_uri} run {summary.mlflow_run_id}"
    )
    return 0
