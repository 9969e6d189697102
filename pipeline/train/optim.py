"""AdamW parameter groups and the warmup + poly learning-rate schedule of kMaX-DeepLab.

Follows the released recipes (reference_kmax.md §5): AdamW with decoupled weight decay applied only
to conv/linear kernels (deeplab2 ``trainer.proto`` regex ``.*(kernel|weight):0$``; bytedance/kmax-deeplab
``train_net.py`` @ f8e1d046 sets decay 0 for norms, biases, relative-position tables and cluster
centres), the backbone at ``lr * backbone_multiplier``, and the deeplab2 schedule
``lr * t / warmup`` for ``t < warmup`` then ``lr * (1 - t / T) ** power`` (warmup counted in T).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.config import TrainConfig

BACKBONE_PREFIX = "backbone."
"""Parameters whose name (after stripping a DDP ``module.`` prefix) starts with this get the backbone lr."""

DEFAULT_NO_DECAY_KEYWORDS = ("cluster_center", "rel_pos", "relative_position", "rpe", "pos_embed", "gamma")
"""Name fragments of multi-dimensional parameters that must not be decayed: k-means cluster centres,
relative-position tables, positional embeddings and ConvNeXt layer-scale ``gamma``. One-dimensional
parameters (norm scales/shifts, biases) are always excluded."""


def _strip_wrapper(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def is_no_decay(name: str, param: torch.Tensor, keywords: Iterable[str] = DEFAULT_NO_DECAY_KEYWORDS) -> bool:
    """True for parameters excluded from weight decay: norms, biases (ndim <= 1) and named tables."""
    if param.ndim <= 1:
        return True
    leaf = _strip_wrapper(name)
    return any(k in leaf for k in keywords)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_multiplier: float,
    no_decay_keywords: Sequence[str] = DEFAULT_NO_DECAY_KEYWORDS,
) -> list[dict]:
    """Split trainable parameters into up to four AdamW groups.

    Groups are (backbone | rest) x (decay | no decay); each has ``lr``, ``weight_decay``, ``name``
    and ``param_names`` (kept for tests and logging; AdamW ignores unknown keys). Empty groups are
    dropped. Every trainable parameter lands in exactly one group.
    """
    buckets: dict[tuple[bool, bool], tuple[list, list]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (_strip_wrapper(name).startswith(BACKBONE_PREFIX), is_no_decay(name, p, no_decay_keywords))
        params, names = buckets.setdefault(key, ([], []))
        params.append(p)
        names.append(name)
    groups = []
    for (backbone, no_decay), (params, names) in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "param_names": names,
                "name": f"{'backbone' if backbone else 'head'}_{'no_decay' if no_decay else 'decay'}",
                "lr": lr * (backbone_multiplier if backbone else 1.0),
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return groups


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_multiplier: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-7,
    no_decay_keywords: Sequence[str] = DEFAULT_NO_DECAY_KEYWORDS,
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (eps 1e-7 as the TF reference).

    ``foreach=True`` also on CPU, where torch would pick the per-parameter Python loop: the multi-tensor
    update is one call per group instead of one per parameter (the tiny model has ~400 parameters; the loop
    took 12 % of a CPU training step)."""
    groups = param_groups(model, lr, weight_decay, backbone_multiplier, no_decay_keywords)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def warmup_poly_factor(
    step: int, total_steps: int, warmup_steps: int, power: float, warmup_start: float
) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based).

    ``warmup_start + (1 - warmup_start) * step / warmup_steps`` during warmup, then
    ``(1 - step / total_steps) ** power``; 0 at and after ``total_steps``.
    """
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    if step >= total_steps:
        return 0.0
    return (1.0 - step / total_steps) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    power: float = 0.9,
    warmup_start: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `warmup_poly_factor` to every group's base lr; call ``.step()`` once per
    optimiser step. Its state dict holds only the step count, so it checkpoints and resumes exactly."""
    if total_steps <= 0:
        raise ValueError(f"train.steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"train.warmup_steps must be in [0, train.steps), got {warmup_steps}")

    def factor(step: int) -> float:
        return warmup_poly_factor(step, total_steps, warmup_steps, power, warmup_start)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimization(
    model: nn.Module, train: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and lr schedule a run's ``train`` section describes (every field read here, once)."""
    optimizer = build_optimizer(
        model, train.lr, train.weight_decay, train.backbone_lr_multiplier, eps=train.adam_eps
    )
    scheduler = build_scheduler(
        optimizer, train.steps, train.warmup_steps, train.poly_power, train.warmup_start
    )
    return optimizer, scheduler
