"""The Ray Train per-worker loop: ``train_fn_per_worker(loop_config)`` (built and launched by
pipeline.train.driver).

``loop_config`` = {"experiment": ExperimentConfig as a plain dict, "tracking_uri": str, "mlflow_run_id": str,
"progress_file": str, "train_rows": int (rows per data epoch), "passes": int (copies of a small split per
epoch, pipeline.data.records.training_dataset), "val_dir": str,
"fault_injection": None | {"step", "rank", "marker", "delay_s"}} (a chaos test of fault tolerance: the given
rank calls ``os._exit(1)`` after finishing that step, once, guarded by the marker file).

One optimiser step = ``train.grad_accum`` micro-batches of ``data.batch_size`` images per worker, read from
this worker's shard of the "train" dataset (``get_dataset_shard``) and augmented in the worker by
pipeline.data.augment.AugmentCollate (seeded per (seed, epoch, record), so an epoch is reproducible). DDP over
gloo (CPU) or NCCL (GPU) by ``ray.train.torch.prepare_model``; SyncBatchNorm when several GPUs train.

Determinism and exact resume: before every step the global torch RNG and the criterion's sampling generator
are seeded from (seed, step, rank), and the data position is derived from the step (epoch = consumed
micro-batches // micro-batches per epoch; the batches of the epoch already consumed are skipped), so a run
resumed from a checkpoint at step s continues exactly as the uninterrupted run would.

Checkpoints are written by rank 0 (pipeline.train.checkpoint: atomic, weights_only-loadable) and reported
by every rank through ``ray.train.report`` (a barrier). Rank 0 logs to MLflow (pipeline.tracking.RunLogger
on the run id the driver created; per-step metrics through a BackgroundMetrics thread,
flushed before each checkpoint) and appends progress lines to ``progress_file`` for the driver to print.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

SEED_STRIDE = 1_000_003
"""Per-step seeds are ``seed * SEED_STRIDE + step * world + rank`` (distinct for every (step, rank))."""

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUX_MARK = "_aux"
"""Loss keys of the per-decoder-layer outputs contain this (kmax_model.criterion: ``loss_pq_dice_aux0``)."""


def _step_seed(seed: int, step: int, rank: int, world: int) -> int:
    return seed * SEED_STRIDE + step * world + rank


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
    return images, targets


class _Batches:
    """Endless micro-batches of this worker's shard, epoch by epoch, starting at a given micro-batch.

    ``batches_per_epoch`` is fixed (rows per worker // batch size, drop_last), so the position of
    micro-batch ``m`` is (epoch ``m // batches_per_epoch``, index ``m % batches_per_epoch``)."""

    def __init__(
        self,
        shard,
        augment_cfg,
        batch_size: int,
        batches_per_epoch: int,
        start: int,
        passes: int = 1,
        input_targets: bool = False,
    ):
        self.shard, self.augment_cfg, self.batch_size, self.passes = shard, augment_cfg, batch_size, passes
        self.input_targets = input_targets
        self.per_epoch = batches_per_epoch
        self.epoch, skip = divmod(start, batches_per_epoch)
        self._iter = self._epoch_iter()
        for _ in range(skip):  # replay the part of the epoch consumed before the checkpoint
            next(self._iter)
        self.wait_s = 0.0

    def _epoch_iter(self):
        from pipeline.data.augment import AugmentCollate

        it = self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            collate_fn=AugmentCollate(self.augment_cfg, self.epoch, self.passes, self.input_targets),
            drop_last=True,
            prefetch_batches=2,
        )
        count = 0
        for batch in it:
            if count == self.per_epoch:
                continue  # drain: streaming_split needs every consumer to finish the epoch
            count += 1
            yield batch

    def next(self) -> dict:
        t0 = time.perf_counter()
        while True:
            try:
                batch = next(self._iter)
                break
            except StopIteration:
                self.epoch += 1
                self._iter = self._epoch_iter()
        self.wait_s += time.perf_counter() - t0
        return batch


def _all_reduce_mean(values: dict[str, float], world: int, device) -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def train_fn_per_worker(loop_config: dict) -> None:  # noqa: C901 - the loop reads best top to bottom
    import ray.train
    import ray.train.torch

    from kmax_model.criterion import LOSS_KEY_TO_WEIGHT_FIELD, build_criterion
    from kmax_model.model import build_model
    from pipeline.config import ExperimentConfig
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.optim import build_optimizer, build_scheduler
    from pipeline.train.validation import Evaluator

    cfg = ExperimentConfig.from_dict(loop_config["experiment"])
    tcfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # A loss weighted 0 is not computed (kmax_model.criterion), so the head it trains gets no gradient,
    # which DDP refuses unless told to look for unused parameters (an extra graph walk per step).
    disabled = any(getattr(cfg.model.loss, f) == 0 for f in LOSS_KEY_TO_WEIGHT_FIELD.values())
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True} if disabled else None
    )
    criterion = build_criterion(cfg.model)
    optimizer = build_optimizer(
        model, tcfg.lr, tcfg.weight_decay, tcfg.backbone_lr_multiplier, eps=tcfg.adam_eps
    )
    scheduler = build_scheduler(optimizer, tcfg.steps, tcfg.warmup_steps, tcfg.poly_power, tcfg.warmup_start)
    amp_dtype = AMP_DTYPES.get(tcfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.precision == "fp16")

    step, best_pq = 0, float("-inf")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = ckpt.load_checkpoint(d)
            ckpt.check_compatible(
                state["config"], loop_config["experiment"], checkpoint.path, ExperimentConfig().to_dict()
            )
        step = ckpt.restore(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        best_pq = state["metrics"].get("best_pq", best_pq)

    logger = step_metrics = None
    if rank == 0:
        from pipeline.tracking import BackgroundMetrics, RunLogger, flatten_params

        logger = RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
        if not logger.has_params():
            logger.log_params(flatten_params(loop_config["experiment"]))
            logger.log_dict(loop_config["experiment"], "config.json")
        step_metrics = BackgroundMetrics(RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"]))
    progress = Path(loop_config["progress_file"]) if rank == 0 else None

    rows = int(loop_config["train_rows"]) // world
    per_epoch = rows // cfg.data.batch_size
    if per_epoch < 1:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} exceeds the {rows} training images "
            f"of each of {world} workers"
        )
    batches = _Batches(
        ray.train.get_dataset_shard("train"),
        cfg.data.augment,
        cfg.data.batch_size,
        per_epoch,
        step * tcfg.grad_accum,
        int(loop_config["passes"]),
        input_targets=cfg.model.loss.mask_loss_at == "input",
    )
    evaluator = Evaluator(cfg, loop_config["val_dir"], rank, world, device)
    fault = loop_config.get("fault_injection")
    images_per_step = cfg.data.batch_size * tcfg.grad_accum * world
    last_eval: dict[str, float] = {}

    model.train()
    while step < tcfg.steps:
        t0 = time.perf_counter()
        wait0 = batches.wait_s
        torch.manual_seed(_step_seed(tcfg.seed, step, rank, world))
        generator = torch.Generator(device=device).manual_seed(_step_seed(tcfg.seed + 1, step, rank, world))
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(tcfg.grad_accum):
            images, targets = _to_device(batches.next(), device)
            last = micro == tcfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
            with sync:
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    outputs = model(images)
                losses = criterion(outputs, targets, generator=generator)
                total = criterion.total(losses)
                scaler.scale(total / tcfg.grad_accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / tcfg.grad_accum
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) / tcfg.grad_accum
        scaler.step(optimizer)
        scaler.update()
        lr = scheduler.get_last_lr()
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - t0
        metrics = _all_reduce_mean(sums, world, device)
        metrics.update(
            lr=lr[-1] if lr else 0.0,
            images_per_s=images_per_step / elapsed,
            data_wait_fraction=(batches.wait_s - wait0) / elapsed,
            epoch=float(batches.epoch),
        )
        if step_metrics is not None:
            logged = step % tcfg.log_interval == 0 or step == tcfg.steps
            # the per-decoder-layer terms (`_aux<i>`: 30 of the tiny model's 45 series) every log_interval
            # steps only; the total, each final-layer term, lr and throughput every step
            step_metrics.log_metrics(
                {f"train/{k}": v for k, v in metrics.items() if logged or AUX_MARK not in k}, step
            )
            if logged:
                with progress.open("a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")

        if fault and step == fault["step"] and rank == fault["rank"] and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"killed rank {rank} at step {step}\n")
            # optional delay: lets the controller register the previous report before the crash (its
            # health check polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, reference_ray_mlflow.md §1)
            time.sleep(float(fault.get("delay_s", 0.0)))
            os._exit(1)  # chaos test of fault tolerance: the worker process dies without cleanup

        final = step == tcfg.steps
        do_eval = final or (tcfg.eval_interval and step % tcfg.eval_interval == 0)
        if do_eval:
            last_eval = evaluator.run(model, step, logger)
            model.train()
            if progress is not None:
                with progress.open("a") as f:
                    f.write(json.dumps({"step": step, "eval": last_eval}) + "\n")
        do_ckpt = final or (tcfg.checkpoint_interval and step % tcfg.checkpoint_interval == 0)
        if do_ckpt:
            pq = last_eval.get("eval/pq_all", float("nan"))
            improved = do_eval and pq == pq and pq > best_pq
            best_pq = pq if improved else best_pq
            report = {"step": step, "loss": metrics["loss"], "pq": pq, "best_pq": best_pq}
            with tempfile.TemporaryDirectory() as tmp:
                reported = None
                if rank == 0:
                    step_metrics.flush()  # everything up to this checkpoint is in the store
                    state = ckpt.build_state(
                        step=step,
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        scaler=scaler,
                        config=loop_config["experiment"],
                        mlflow_run_id=loop_config["mlflow_run_id"],
                        metrics={k: v for k, v in report.items() if v == v},
                    )
                    ckpt.save_checkpoint(tmp, state)
                    if improved:
                        best = ckpt.save_checkpoint(Path(cfg.run_dir) / "best", state)
                        logger.log_dict({"path": str(best), "step": step, "pq": pq}, "best_checkpoint.json")
                    reported = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(
                    report,
                    checkpoint=reported,
                    checkpoint_dir_name=f"checkpoint_{step:07d}" if reported else None,
                )
    if logger is not None:
        step_metrics.close()
        with progress.open("a") as f:
            f.write(json.dumps({"done": True, "step": step, **last_eval}) + "\n")
