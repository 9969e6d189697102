"""Small shared blocks: normalisation factory, conv-norm-act, drop path, channels-first LayerNorm.

Norms are injected: `NormFactory` is built once from the config (``norm`` Literal, eps, momentum) and
called as ``norm(channels, dims=2, gamma_init=1.0)``; unknown names raise. deeplab2 uses SyncBN with
eps 1e-3 and TF momentum 0.99 (torch 0.01) everywhere in heads and decoders; plain BatchNorm is used
here and the training code converts it to SyncBatchNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GN_MAX_GROUPS = 32
"""GroupNorm (``norm="gn"``) uses the largest divisor of the channel count that is <= this."""


@dataclass(frozen=True)
class NormFactory:
    """Builds normalisation layers of one kind. ``kind``: "bn" (BatchNorm1d/2d) or "gn" (GroupNorm)."""

    kind: str = "bn"
    eps: float = 1e-3
    momentum: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in ("bn", "gn"):
            raise ValueError(f"norm must be 'bn' or 'gn', got {self.kind!r}")

    def __call__(self, channels: int, dims: int = 2, gamma_init: float = 1.0) -> nn.Module:
        if dims not in (1, 2):
            raise ValueError(f"norm dims must be 1 or 2, got {dims}")
        if self.kind == "bn":
            layer: nn.Module = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(
                channels, eps=self.eps, momentum=self.momentum
            )
        else:
            groups = max(g for g in range(1, min(GN_MAX_GROUPS, channels) + 1) if channels % g == 0)
            layer = nn.GroupNorm(groups, channels, eps=self.eps)
        nn.init.constant_(layer.weight, gamma_init)
        return layer


def make_norm_factory(kind: str, eps: float = 1e-3, momentum: float = 0.01) -> NormFactory:
    """The one place a norm name is resolved (raises ValueError on unknown names)."""
    return NormFactory(kind, eps, momentum)


class ConvNormAct(nn.Module):
    """``act(norm(conv(x)))`` for 1-D ([B,C,L]) or 2-D ([B,C,H,W]) inputs.

    ``act`` is "gelu" or None; ``gamma_init`` initialises the norm scale (0 for residual branches,
    deeplab2's ``bn_gamma_initializer='zeros'``); ``init_std`` switches the conv init to truncated normal.
    Padding is ``kernel_size // 2`` ("SAME" for odd kernels; with stride 2 this gives ceil(H / 2)).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        norm: NormFactory | None,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        dims: int = 2,
        act: str | None = "gelu",
        bias: bool = False,
        gamma_init: float = 1.0,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv = conv_cls(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)
        if init_std is not None:
            nn.init.trunc_normal_(self.conv.weight, std=init_std)
        self.norm = norm(out_ch, dims, gamma_init) if norm is not None else nn.Identity()
        if act not in (None, "gelu"):
            raise ValueError(f"unknown activation {act!r} (supported: 'gelu', None)")
        self.act = nn.GELU() if act == "gelu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with prob ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of `drop_path` (each call draws an independent mask)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``[B, C, H, W]`` tensor (ConvNeXt's channels_first LN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (deeplab2's convention for "SAME" strided grids)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
