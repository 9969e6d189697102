"""One optimiser step, without Ray: the only training step of the project.

The Ray Train worker (pipeline.train.worker), the training benchmark (benchmarks/bench_train.py) and the
overfit test call `train_step`, so the three cannot drift apart. It does: zero the gradients; for each of
``grad_accum`` micro-batches, forward (under autocast when ``amp_dtype`` is set), the criterion's dict of
unweighted losses, their weighted sum (``criterion.total``), backward of ``total / grad_accum`` through the
gradient scaler (DDP gradient synchronisation only on the last micro-batch); then the global L2 norm of the
gradients (unscaled first when a scaler is enabled), clipped to ``grad_clip_norm`` when that is > 0
(bytedance/kmax-deeplab@f8e1d04 train_net.py "full_model" clipping: one norm over every parameter); then
the optimiser step and the scheduler step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

Batch = tuple[torch.Tensor, list[dict]]
"""(images float [B, 3, H, W] on the model's device, targets: list of kmax_model.targets.Target)."""


@dataclass
class Trainee:
    """What a step updates: the (possibly DDP-wrapped) model, its criterion, optimiser and lr schedule
    (None: a constant lr), the gradient scaler (None: no scaling; fp16 needs an enabled one), the autocast
    dtype (None: fp32) and ``grad_clip_norm`` (0: the norm is measured, not clipped)."""

    model: torch.nn.Module
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    grad_clip_norm: float = 0.0


def _sync_context(model: torch.nn.Module, last: bool):
    """DDP's ``no_sync`` on all but the last micro-batch: gradients are all-reduced once per step."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _backward(trainee: Trainee, batch: Batch, grad_accum: int, generator) -> dict[str, float]:
    """Forward, losses, backward of ``total / grad_accum`` for one micro-batch; returns its losses (and
    "loss", the total) as floats."""
    images, targets = batch
    device = images.device.type
    with torch.autocast(
        device, dtype=trainee.amp_dtype or torch.float32, enabled=trainee.amp_dtype is not None
    ):
        outputs = trainee.model(images)
    losses = trainee.criterion(outputs, targets, generator=generator)
    total = trainee.criterion.total(losses)
    scaled = total / grad_accum
    (trainee.scaler.scale(scaled) if trainee.scaler is not None else scaled).backward()
    return {**{k: float(v.detach()) for k, v in losses.items()}, "loss": float(total.detach())}


def _grad_norm(trainee: Trainee) -> float:
    """The global L2 norm of the (unscaled) gradients, after which they are clipped to ``grad_clip_norm``
    when that is > 0."""
    if trainee.scaler is not None and trainee.scaler.is_enabled():
        trainee.scaler.unscale_(trainee.optimizer)  # measure and clip true gradients; step() knows
    params = [p for group in trainee.optimizer.param_groups for p in group["params"] if p.grad is not None]
    limit = trainee.grad_clip_norm if trainee.grad_clip_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def train_step(
    trainee: Trainee, next_batch: Callable[[], Batch], grad_accum: int = 1, generator=None
) -> dict[str, float]:
    """One optimiser step over ``grad_accum`` micro-batches from ``next_batch()``.

    Returns the losses averaged over the micro-batches (criterion keys plus "loss"), "grad_norm" (the
    global L2 norm of the gradients before clipping; inf or nan after an fp16 overflow, a step the scaler
    skips) and "lr", the learning rate of the last parameter group used by this step."""
    if grad_accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {grad_accum}")
    trainee.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for micro in range(grad_accum):
        with _sync_context(trainee.model, micro == grad_accum - 1):
            losses = _backward(trainee, next_batch(), grad_accum, generator)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v / grad_accum
    sums["grad_norm"] = _grad_norm(trainee)
    if trainee.scaler is not None:
        trainee.scaler.step(trainee.optimizer)
        trainee.scaler.update()
    else:
        trainee.optimizer.step()
    sums["lr"] = float(trainee.optimizer.param_groups[-1]["lr"])
    if trainee.scheduler is not None:
        trainee.scheduler.step()
    return sums
