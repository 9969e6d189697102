"""Auxiliary semantic branch (training only): a Panoptic-DeepLab single decoder + head.

deeplab2 ``model/decoder/panoptic_deeplab.py`` as configured by kMaX (docs/reference_kmax.md §1.6):
ASPP on res5 (1x1 + three dilated 3x3 + image pooling, projection, dropout), upsample to stride 8 and
fuse with a projection of res3, upsample to stride 4 and fuse with a projection of res2 (each fuse is a
depthwise 5x5 + 1x1 conv), then a head (depthwise 5x5, 1x1, 1x1 -> K+1 with bias). Activations are GELU
(kMaX uses GELU throughout). Output: ``[B, K+1, H/4, W/4]`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kmax_model.config import SemanticHeadConfig
from kmax_model.layers import ConvNormAct, NormFactory, resize_bilinear

FUSE_KERNEL = 5
CLASS_INIT_STD = 0.01


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling ``[B, C, h, w] -> [B, out_ch, h, w]``."""

    def __init__(
        self, in_ch: int, out_ch: int, rates: tuple[int, ...], norm: NormFactory, dropout: float
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList([ConvNormAct(in_ch, out_ch, norm, 1)])
        for r in rates:
            conv = nn.Conv2d(in_ch, out_ch, 3, padding=r, dilation=r, bias=False)
            self.branches.append(nn.Sequential(conv, norm(out_ch), nn.GELU()))
        # The image-pooling branch is 1x1 spatially: a norm there fails for batch 1 in training, so it is a
        # biased conv + GELU (deeplab2 has BN here; with batch 1 that BN only outputs its beta anyway).
        self.pool = ConvNormAct(in_ch, out_ch, None, 1, bias=True)
        self.project = ConvNormAct(out_ch * (len(rates) + 2), out_ch, norm, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        outs.append(pooled.expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.dropout(self.project(torch.cat(outs, dim=1)))


def _fuse(in_ch: int, out_ch: int, norm: NormFactory) -> nn.Sequential:
    return nn.Sequential(
        ConvNormAct(in_ch, in_ch, norm, FUSE_KERNEL, groups=in_ch), ConvNormAct(in_ch, out_ch, norm, 1)
    )


class SemanticHead(nn.Module):
    """``{"res2", "res3", "res5"}`` features -> semantic logits ``[B, K+1, h(res2), w(res2)]``."""

    def __init__(
        self, cfg: SemanticHeadConfig, in_channels: dict[str, int], num_classes: int, norm: NormFactory
    ):
        super().__init__()
        c = cfg.decoder_channels
        low3, low2 = cfg.low_level_channels
        self.aspp = ASPP(in_channels["res5"], cfg.aspp_channels, cfg.aspp_rates, norm, cfg.dropout)
        self.proj3 = ConvNormAct(in_channels["res3"], low3, norm, 1)
        self.fuse3 = _fuse(cfg.aspp_channels + low3, c, norm)
        self.proj2 = ConvNormAct(in_channels["res2"], low2, norm, 1)
        self.fuse2 = _fuse(c + low2, c, norm)
        self.head = nn.Sequential(
            ConvNormAct(c, c, norm, FUSE_KERNEL, groups=c),
            ConvNormAct(c, cfg.head_channels, norm, 1),
            nn.Conv2d(cfg.head_channels, num_classes + 1, 1),
        )
        nn.init.trunc_normal_(self.head[-1].weight, std=CLASS_INIT_STD)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.aspp(features["res5"])
        res3, res2 = features["res3"], features["res2"]
        x = self.fuse3(torch.cat([resize_bilinear(x, tuple(res3.shape[-2:])), self.proj3(res3)], dim=1))
        x = self.fuse2(torch.cat([resize_bilinear(x, tuple(res2.shape[-2:])), self.proj2(res2)], dim=1))
        return self.head(x)
