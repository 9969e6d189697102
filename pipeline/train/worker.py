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
by every rank through ``ray.train.report`` (a barrier); the best-PQ checkpoint is also copied to
``<run_dir>/best``. Rank 0 logs to MLflow and to the progress file (pipeline.train.run_log).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import checkpoint as ckpt
from pipeline.config import ExperimentConfig
from pipeline.train.resume import check_compatible
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
        tracking_uri, mlflow_run_id: the MLflow run rank 0 logs to.
        progress_file: where rank 0 appends progress lines.
        train_rows: rows of one data epoch (all workers); passes: copies of a small split per epoch
            (pipeline.data.records.training_dataset).
        hooks: `StepHook` callables (picklable).
    """

    cfg: ExperimentConfig
    tracking_uri: str
    mlflow_run_id: str
    progress_file: str
    train_rows: int
    passes: int = 1
    hooks: tuple[StepHook, ...] = field(default_factory=tuple)


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


def _build(cfg: ExperimentConfig, rank: int, world: int) -> _Worker:
    import ray.train.torch

    from kmax_model.criterion import LOSS_KEY_TO_WEIGHT_FIELD, build_criterion
    from kmax_model.model import build_model
    from pipeline.train.optim import build_optimization

    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
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
        model, build_criterion(cfg.model), optimizer, scheduler, scaler, AMP_DTYPES.get(cfg.train.precision)
    )
    return _Worker(trainee, device, rank, world)


def _resume(worker: _Worker, cfg: ExperimentConfig) -> None:
    """Continue from the checkpoint Ray Train restores after a failure or on a rerun, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as d:
        state = ckpt.load_checkpoint(d)
    check_compatible(state["config"], cfg.to_dict(), checkpoint.path, ExperimentConfig().to_dict())
    t = worker.trainee
    worker.step = ckpt.restore(
        state, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler
    )
    worker.best_pq = state["metrics"].get("best_pq", worker.best_pq)


def _batches(run: WorkerRun, worker: _Worker):
    import ray.train

    from pipeline.train.batches import MicroBatches

    cfg = run.cfg
    per_epoch = run.train_rows // worker.world // cfg.data.batch_size  # >= 1: checked by the driver
    shard = ray.train.get_dataset_shard("train")
    input_targets = cfg.model.loss.mask_loss_at == "input"
    start = worker.step * cfg.train.grad_accum
    return MicroBatches(
        shard, cfg.data.augment, cfg.data.batch_size, per_epoch, start, run.passes, input_targets
    )


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
            log.flush()  # everything up to this checkpoint is in the store
            t = worker.trainee
            state = ckpt.build_state(
                step=step, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler,
                config=run.cfg.to_dict(), mlflow_run_id=run.mlflow_run_id,
                metrics={k: v for k, v in report.items() if v == v},
            )  # fmt: skip
            ckpt.save_checkpoint(tmp, state)
            if improved:
                best = ckpt.save_checkpoint(Path(run.cfg.run_dir) / "best", state)
                log.best(best, step, pq)
            reported = ray.train.Checkpoint.from_directory(tmp)
        name = f"checkpoint_{step:07d}" if reported else None
        ray.train.report(report, checkpoint=reported, checkpoint_dir_name=name)


def train_fn_per_worker(loop_config: dict) -> None:
    import ray.train

    from pipeline.tracking import flatten_params
    from pipeline.train.run_log import RunLog
    from pipeline.train.validation import Validator

    run: WorkerRun = loop_config["run"]
    cfg, ctx = run.cfg, ray.train.get_context()
    worker = _build(cfg, ctx.get_world_rank(), ctx.get_world_size())
    _resume(worker, cfg)
    log = RunLog(
        run.tracking_uri, run.mlflow_run_id, run.progress_file, cfg.train.log_interval, worker.rank == 0
    )
    log.start(flatten_params(cfg.to_dict()), cfg.to_dict())
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
    log.close(worker.step, last_eval)
