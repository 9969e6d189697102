"""The Ray Train per-worker function: set-up, then a short loop over pipeline.train.step.train_step.

``train_fn_per_worker({"run": WorkerRun})`` is launched by pipeline.train.driver on every worker. Set-up:
the model (identical initial weights on every rank), DDP over gloo (CPU) or NCCL (GPU) by
``ray.train.torch.prepare_model`` (SyncBatchNorm when several GPUs train), optimiser, schedule, scaler, and
the latest checkpoint when Ray Train restores one. Loop: one step, its metrics, the run's hooks, then
validation and checkpoint when due.

Determinism and exact resume: before every step the global torch RNG and the criterion's sampling generator
are seeded from (seed, step, rank), and the data position is derived from the step (pipeline.train.batches),
so a run resumed from a checkpoint at step s continues exactly as the uninterrupted run would.

Checkpoints are written by rank 0 (pipeline.checkpoint: atomic, weights_only-loadable) and reported
by every rank through ``ray.train.report`` (a barrier) into the run's storage; the best-PQ checkpoint is also
copied to ``<run location>/best``. Rank 0 reports metrics, progress and figures to the driver and journals
the metrics (pipeline.train.run_log); no worker talks to MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt
from pipeline import storage
from pipeline.config import ExperimentConfig
from pipeline.train.resume import check_compatible, fresh_checkpoint_name, newest_valid_checkpoint
from pipeline.train.step import Trainee, train_step

SEED_STRIDE = 1_000_003
"""Per-step seeds are ``seed * SEED_STRIDE + step * world + rank`` (distinct for every (step, rank))."""
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

StepHook = Callable[..., None]
"""Called on every worker after each step as ``hook(step=int, rank=int, run_dir=str)`` (a profiler, a
progress probe; the tests inject faults with one)."""


@dataclass
class WorkerRun:
    """Everything a worker needs, built by the driver (pipeline.train.driver.fit).

    Attributes:
        cfg: the bound experiment (classes from the manifest, absolute paths).
        mlflow_run_id: the MLflow run the driver logs to (recorded in every checkpoint).
        channel: the run's `pipeline.train.run_log.RunChannel` actor: rank 0's events go to the driver.
        shards, group_rows: the training split's shard locations and the rows of each of their row groups
            (pipeline.train.data_order); passes: copies of a small split per epoch (data.min_epoch_rows).
        hooks: `StepHook` callables (picklable).
        initial: the weights a new run starts from (pipeline.train.init_weights; None: none named, or the
            run resumes), loaded unless a checkpoint is restored.
    """

    cfg: ExperimentConfig
    mlflow_run_id: str
    channel: Any
    shards: list[str]
    group_rows: list[list[int]]
    passes: int = 1
    hooks: tuple[StepHook, ...] = field(default_factory=tuple)
    initial: Any = None


def step_seed(seed: int, step: int, rank: int, world: int) -> int:
    return seed * SEED_STRIDE + step * world + rank


@dataclass
class _Worker:
    """The live state of one worker's run."""

    trainee: Trainee
    device: torch.device
    rank: int
    world: int
    step: int = 0
    best_pq: float = float("-inf")


def _build(run: WorkerRun, rank: int, world: int, found: tuple[dict, str] | None) -> _Worker:
    """The model (initial weights loaded unless ``found``, the checkpoint to restore, will replace them)
    wrapped for DDP, its criterion, optimiser, schedule and scaler."""
    import ray.train.torch

    from kmax_model.criterion import LOSS_KEY_TO_WEIGHT_FIELD, build_criterion
    from kmax_model.model import build_model
    from pipeline.train.optim import build_optimization

    cfg = run.cfg
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    if found is None and run.initial is not None:
        run.initial.load_into(model)  # every rank the same tensors, before DDP wraps the model
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # A loss weighted 0 is not computed (kmax_model.criterion), so the head it trains gets no gradient,
    # which DDP refuses unless told to look for unused parameters (an extra graph walk per step).
    disabled = any(getattr(cfg.model.loss, f) == 0 for f in LOSS_KEY_TO_WEIGHT_FIELD.values())
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True} if disabled else None
    )
    optimizer, scheduler = build_optimization(model, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    trainee = Trainee(
        model, build_criterion(cfg.model), optimizer, scheduler, scaler, AMP_DTYPES.get(cfg.train.precision),
        cfg.train.grad_clip_norm,
    )  # fmt: skip
    return _Worker(trainee, device, rank, world)


def _checkpoint_to_restore(cfg: ExperimentConfig, warn) -> tuple[dict, str] | None:
    """The newest intact checkpoint of the run when Ray Train restores one (after a failure or on a rerun):
    a damaged newer one is skipped with ``warn`` and kept (pipeline.train.resume)."""
    import ray.train

    if ray.train.get_checkpoint() is None:
        return None
    return newest_valid_checkpoint(cfg.run_location, warn)


def _resume(worker: _Worker, cfg: ExperimentConfig, found: tuple[dict, str] | None) -> None:
    """Continue from ``found`` (state, folder), refused when trained under another config."""
    if found is None:
        return
    state, folder = found
    check_compatible(state["config"], cfg.to_dict(), folder, ExperimentConfig().to_dict())
    t = worker.trainee
    worker.step = ckpt.restore(
        state, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler
    )
    worker.best_pq = state["metrics"].get("best_pq", worker.best_pq)


def _batches(run: WorkerRun, worker: _Worker):
    """This worker's micro-batches in the run's data order, from the micro-batch the run is at."""
    from pipeline.train.batches import MicroBatches
    from pipeline.train.data_order import EpochOrder, split_units

    cfg = run.cfg
    units = split_units(run.group_rows, run.passes, worker.world)
    order = EpochOrder(units, worker.world, cfg.data.batch_size, cfg.train.seed, cfg.data.shuffle_window)
    return MicroBatches(
        run.shards, order, worker.rank, cfg.data.augment, worker.step * cfg.train.grad_accum, run.passes,
        input_targets=cfg.model.loss.mask_loss_at == "input",
    )  # fmt: skip


def _all_reduce_mean(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _one_step(worker: _Worker, batches, cfg: ExperimentConfig) -> dict[str, float]:
    """Seed, step, average the losses over ranks; adds throughput, data wait and epoch."""
    import time

    t0, wait0 = time.perf_counter(), batches.wait_s
    seed, step, rank, world = cfg.train.seed, worker.step, worker.rank, worker.world
    torch.manual_seed(step_seed(seed, step, rank, world))
    generator = torch.Generator(device=worker.device).manual_seed(step_seed(seed + 1, step, rank, world))

    def next_batch():
        batch = batches()
        images = batch["images"].to(worker.device, non_blocking=True)
        targets = [
            {k: v.to(worker.device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]
        ]
        return images, targets

    metrics = train_step(worker.trainee, next_batch, cfg.train.grad_accum, generator)
    lr = metrics.pop("lr")
    worker.step += 1
    elapsed = time.perf_counter() - t0
    metrics = _all_reduce_mean(metrics, world, worker.device)
    metrics.update(
        lr=lr,
        images_per_s=cfg.data.batch_size * cfg.train.grad_accum * world / elapsed,
        data_wait_fraction=(batches.wait_s - wait0) / elapsed,
        epoch=float(batches.epoch),
    )
    return metrics


def _due(step: int, interval: int, final: bool) -> bool:
    return final or bool(interval and step % interval == 0)


def _checkpoint(worker: _Worker, run: WorkerRun, log, loss: float, pq: float, evaluated: bool) -> None:
    """Every rank reports (a barrier); rank 0 writes the checkpoint and, when PQ improved, the best copy."""
    import ray.train

    improved = evaluated and pq == pq and pq > worker.best_pq
    worker.best_pq = pq if improved else worker.best_pq
    step = worker.step
    report = {"step": step, "loss": loss, "pq": pq, "best_pq": worker.best_pq}
    with tempfile.TemporaryDirectory() as tmp:
        reported = None
        if worker.rank == 0:
            log.checkpoint()  # everything up to this checkpoint is journalled and with the driver
            t = worker.trainee
            state = ckpt.build_state(
                step=step, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler,
                config=run.cfg.to_dict(), mlflow_run_id=run.mlflow_run_id,
                metrics={k: v for k, v in report.items() if v == v},
            )  # fmt: skip
            ckpt.save_checkpoint(tmp, state)
            if improved:
                best = ckpt.save_checkpoint(storage.join(run.cfg.run_location, "best"), state)
                log.record({"path": best, "step": step, "pq": pq}, "best_checkpoint.json")
            reported = ray.train.Checkpoint.from_directory(tmp)
        name = fresh_checkpoint_name(run.cfg.run_location, step) if reported else None
        ray.train.report(report, checkpoint=reported, checkpoint_dir_name=name)


def train_fn_per_worker(loop_config: dict) -> None:
    import ray.train

    from pipeline.train.run_log import RunLog
    from pipeline.train.validation import Validator

    run: WorkerRun = loop_config["run"]
    cfg, ctx = run.cfg, ray.train.get_context()
    log = RunLog(run.channel, cfg.run_location, cfg.train.log_interval, ctx.get_world_rank() == 0)
    found = _checkpoint_to_restore(cfg, log.warning)
    worker = _build(run, ctx.get_world_rank(), ctx.get_world_size(), found)
    _resume(worker, cfg, found)
    batches = _batches(run, worker)
    validator = Validator(cfg, worker.rank, worker.world, worker.device)
    last_eval: dict[str, float] = {}
    worker.trainee.model.train()
    while worker.step < cfg.train.steps:
        metrics = _one_step(worker, batches, cfg)
        final = worker.step == cfg.train.steps
        log.step(worker.step, metrics, final)
        for hook in run.hooks:
            hook(step=worker.step, rank=worker.rank, run_dir=cfg.run_dir)
        evaluated = _due(worker.step, cfg.train.eval_interval, final)
        if evaluated:
            last_eval = validator.run(worker.trainee.model, worker.step, log)
            worker.trainee.model.train()
        if _due(worker.step, cfg.train.checkpoint_interval, final):
            pq = last_eval.get("eval/pq_all", float("nan"))
            _checkpoint(worker, run, log, metrics["loss"], pq, evaluated)
    batches.close()
    log.close(worker.step, last_eval)
