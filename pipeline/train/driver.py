"""`kmax train`: the Ray Train driver that builds the TorchTrainer, and its command line.

    kmax train --config tiny --set train.steps=300 [--data PREPARED_DIR_OR_URI] [--run-dir DIR]
               [--storage PATH_OR_URI] [--tracking-uri URI] [--num-workers N] [--gpu]

`fit(cfg)` does, in order: make every path absolute (storage from ``KMAX_STORAGE`` when none is given);
check the tracking store (an unreachable MLflow server fails here); with a prepared dataset, read and check
its manifests, bind its classes and refuse an incompatible checkpoint, all before Ray starts; start or join
Ray, and refuse a cluster of several nodes without storage; make the synthetic dataset when no
``data.prepared_dir`` is given; create or resume the MLflow run and log the config; run a TorchTrainer over
pipeline.train.worker.train_fn_per_worker while a thread forwards the workers' reports (progress lines,
metrics, figures) to the terminal and to MLflow (pipeline.train.forwarder).

Where things go: the run's *location* (``cfg.run_location``: the run directory, or
``<storage>/<run dir's name>``) holds everything that must outlive a process or be seen by other nodes;
the run directory, on the driver's disk, what only the driver uses::

    <location>/config.yaml                the resolved ExperimentConfig
    <location>/mlflow_run.json            the MLflow run of this run (a rerun resumes it)
    <location>/ray_results/train/checkpoint_XXXXXXX/state.pt (+ state.json)   checkpoints (Ray Train)
    <location>/best/state.pt              the checkpoint with the best validation PQ
    <location>/journal/steps-*.jsonl      every logged step (pipeline.train.journal)
    <location>/data/prepared              the synthetic dataset, when none was given
    <run_dir>/mlflow.db, mlartifacts/     the embedded MLflow store (when no tracking URI is given)
    <run_dir>/progress.jsonl              the progress records the driver printed

Running ``kmax train`` again with the same run directory resumes from the newest intact checkpoint and
continues the same MLflow run (Ray Train job-level resume: same RunConfig name and storage path).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.checkpoint import CHECKPOINT_FILE
from pipeline.config import (
    ExperimentConfig,
    bind_manifest,
    load_experiment,
    with_absolute_paths,
    with_fields,
)
from pipeline.storage import STORAGE_VARIABLE, filesystem, is_file, is_uri, join, write_text
from pipeline.train.forwarder import Forwarder, MlflowSender
from pipeline.train.journal import journal_location, read_rows
from pipeline.train.progress import PROGRESS_FILE, ProgressLines
from pipeline.train.resume import RAY_RUN_NAME
from pipeline.train.run_log import open_channel


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
    unsent: int = 0  # tracking items the MLflow store did not take (they are in the run's journal)

    @property
    def run_dir(self) -> str:
        return self.config.run_dir


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


def refuse_incompatible_resume(cfg: ExperimentConfig, echo) -> bool:
    """The checkpoint the run will resume from (the newest intact one; damaged newer ones are named and
    kept) is refused when it was trained under another config, before any compute. True: the run resumes."""
    from pipeline.train.resume import check_compatible, newest_valid_checkpoint

    found = newest_valid_checkpoint(cfg.run_location, lambda message: echo(f"warning: {message}"))
    if found is not None:
        state, folder = found
        check_compatible(state["config"], cfg.to_dict(), folder, ExperimentConfig().to_dict())
        echo(f"resuming from {folder}")
    return found is not None


def refuse_shared_nothing_without_storage(cfg: ExperimentConfig, ray) -> None:
    """On a cluster of several nodes, workers do not see this machine's disk: without ``storage`` their
    checkpoints, the prepared data and the run's state would be unreachable. Refused in one line."""
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if nodes > 1 and cfg.storage is None:
        raise ValueError(
            f"this Ray cluster has {nodes} nodes, which do not share this machine's disk: set --storage "
            f"(or {STORAGE_VARIABLE}, or the config field storage) to a shared mount path or an object store "
            "URI such as s3://bucket/prefix"
        )


def _initial_weight_files_exist(cfg: ExperimentConfig) -> None:
    """Named initial weights must exist, before Ray starts; a run with checkpoints (it will resume) reads
    neither file, which may be gone."""
    from pipeline.train.init_weights import require_files
    from pipeline.train.resume import checkpoint_names

    if not checkpoint_names(cfg.run_location):
        require_files(cfg)


def prepare_run(cfg: ExperimentConfig, tracking=None, echo=print):
    """Everything before the trainer: absolute paths, tracking, data, initial weights (not when resuming),
    Ray. Returns (bound cfg, tracking target, `InitialWeights` or None); with a prepared dataset every
    check is made before Ray starts, with the synthetic one the weights are matched once it is bound."""
    from pipeline import tracking as mlflow_tracking
    from pipeline.ray_setup import init_ray, run_cpu_need, with_local_cpus
    from pipeline.train.init_weights import read_initial_weights

    if cfg.storage is None and os.environ.get(STORAGE_VARIABLE):
        cfg = with_fields(cfg, {"storage": os.environ[STORAGE_VARIABLE]})
    cfg = with_absolute_paths(cfg)
    target = tracking or mlflow_tracking.resolve_target(cfg.tracking.uri, cfg.run_dir)
    if tracking is None:
        mlflow_tracking.check_tracking_uri(target.tracking_uri)
    _initial_weight_files_exist(cfg)
    weights = None
    if cfg.data.prepared_dir is not None:  # everything the driver can check, before Ray starts
        cfg = bind_data(cfg)
        if not refuse_incompatible_resume(cfg, echo):
            weights = read_initial_weights(cfg)
    sc = cfg.scaling
    ray = init_ray(with_local_cpus(cfg.ray, run_cpu_need(sc.num_workers, sc.cpus_per_worker)))
    refuse_shared_nothing_without_storage(cfg, ray)
    if cfg.data.prepared_dir is None:
        from pipeline.data.synthetic import ensure_synthetic

        prepared = ensure_synthetic(join(cfg.run_location, "data"), cfg.data, echo)
        cfg = bind_data(with_fields(cfg, {"data.prepared_dir": prepared}))
        if not refuse_incompatible_resume(cfg, echo):
            weights = read_initial_weights(cfg)
    return cfg, target, weights


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
    from pipeline.data.records import split_layout
    from pipeline.train.worker import WorkerRun

    t_start = time.time()
    cfg, target, weights = prepare_run(cfg, tracking, echo)
    location = cfg.run_location
    write_text(join(location, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_id = _start_mlflow_run(cfg, target, tags, weights)
    shards, group_rows = split_layout(cfg.data.prepared_dir, cfg.data.train_split)
    rows = sum(map(sum, group_rows))
    passes = -(-cfg.data.min_epoch_rows // rows) if rows < cfg.data.min_epoch_rows else 1
    channel = open_channel()
    initial = weights.shipped() if weights is not None else None
    run = WorkerRun(cfg, run_id, channel, shards, group_rows, passes, tuple(hooks), initial)
    sender = _sender(target.tracking_uri, run_id, location, echo)
    result = _run_trainer(cfg, run, callbacks or [], Forwarder(
        channel, sender, str(Path(cfg.run_dir) / PROGRESS_FILE), ProgressLines(cfg.train.steps), echo
    ))  # fmt: skip
    final = _checkpoint_location(result.checkpoint)
    best = join(location, "best", CHECKPOINT_FILE)
    best_path = best if is_file(best) else None
    sender.add_artifact("checkpoints.json", json.dumps({"latest": final, "best": best_path}).encode())
    unsent = _close_tracking(sender, "FINISHED", cfg, echo)
    metrics = dict(result.metrics or {})
    steps = int(metrics.get("step", 0))
    return TrainSummary(
        cfg, steps, final, best_path, target.tracking_uri, run_id, metrics, time.time() - t_start, unsent
    )


def _start_mlflow_run(cfg: ExperimentConfig, target, tags: dict | None, weights=None) -> str:
    """Create or resume the run's MLflow run (recorded under its location); log the config once, and the
    initial weights' sha256 (params ``<field>.sha256``) and load report (``initial_weights.json``)."""
    from pipeline import tracking as mlflow_tracking

    location = cfg.run_location
    run_name = cfg.tracking.run_name or Path(cfg.run_dir).name
    tags = {**(tags or {}), "run_dir": cfg.run_dir, "run_location": location}
    run_id, _ = mlflow_tracking.start_or_resume_run(
        target, cfg.tracking.experiment_name, location, run_name, tags
    )
    logger = mlflow_tracking.RunLogger(target.tracking_uri, run_id)
    if not logger.has_params():
        logger.log_params(mlflow_tracking.flatten_params(cfg.to_dict()))
        logger.log_dict(cfg.to_dict(), "config.json")
    if weights is not None:
        logger.log_params(weights.params())
        logger.log_dict(weights.records, "initial_weights.json")
    return run_id


def _sender(tracking_uri: str, run_id: str, location: str, echo) -> MlflowSender:
    """The run's MLflow sender, holding the journal of an earlier attempt (a resumed run): what the store
    misses of it is sent first, what it has is dropped (pipeline.tracking.RunLogger)."""
    sender = MlflowSender(tracking_uri, run_id, echo)
    for row in read_rows(location):
        sender.add_row(row["step"], row["metrics"], row["time_ms"])
    return sender


def _close_tracking(sender: MlflowSender, status: str, cfg: ExperimentConfig, echo) -> int:
    """Send the rest and close the MLflow run; when the store stays unreachable (``tracking.final_flush_s``),
    say where the metrics are. Returns how many items could not be sent."""
    sender.finish(status)
    if sender.flush(cfg.tracking.final_flush_s):
        return 0
    location = cfg.run_location
    echo(
        f"warning: the MLflow store {sender.tracking_uri} did not answer at the end of the run: "
        f"{sender.pending} item(s) not sent. Every logged step is in the journal "
        f"{journal_location(location)}; "
        "run the same `kmax train` again when the store is back and it sends what is missing"
    )
    return sender.pending


def _run_trainer(cfg: ExperimentConfig, run, callbacks: list, forwarder: Forwarder):
    """Fit the TorchTrainer while the forwarder prints progress and sends metrics; a failed run's MLflow run
    is closed FAILED (or left for the journal when the store is down)."""
    trainer = _build_trainer(cfg, run, callbacks)
    forwarder.start()
    try:
        return trainer.fit()
    except BaseException:
        forwarder.stop.set()
        forwarder.join()
        _close_tracking(forwarder.sender, "FAILED", cfg, forwarder.echo)
        raise
    finally:
        forwarder.stop.set()
        forwarder.join()


def _build_trainer(cfg: ExperimentConfig, run, callbacks: list):
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
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME,
            **ray_storage(join(cfg.run_location, "ray_results")),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep,
                checkpoint_score_attribute="step",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.fault.max_failures),
            callbacks=callbacks,
        ),
    )


def ray_storage(location: str) -> dict[str, Any]:
    """Ray Train's ``storage_path`` (and ``storage_filesystem`` for an object store) of a location."""
    if not is_uri(location):
        return {"storage_path": location}
    fs, path = filesystem(location)
    return {"storage_path": path, "storage_filesystem": fs}


def _checkpoint_location(checkpoint) -> str | None:
    """A Ray Train checkpoint as a location string: its path, with the scheme of its filesystem."""
    if checkpoint is None:
        return None
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


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
