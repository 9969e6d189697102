"""Auxiliary semantic branch (training only): a Panoptic-DeepLab single decoder + head, or a light head.

deeplab2 ``model/decoder/panoptic_deeplab.py`` as configured by kMaX (docs/reference_kmax.md §1.6), in the
layout of bytedance/kmax-deeplab ``SemanticPredictor`` / ``ASPP`` (``kmax_transformer_decoder.py`` @
f8e1d046): ASPP on res5 (1x1 + three dilated 3x3 + image pooling, projection, dropout), upsample to stride 8
and fuse with a projection of res3, upsample to stride 4 and fuse with a projection of res2 (each fuse is a
depthwise 5x5 + 1x1 conv), then a head (depthwise 5x5, 1x1, 1x1 -> classes with bias). Activations are GELU
(kMaX uses GELU throughout). Output: ``[B, C, H/4, W/4]`` logits, ``C = K + 1`` (last = void, never a
target) or K (``SemanticHeadConfig.void_channel``).

Without the decoder (``SemanticHeadConfig.decoder = False``, bytedance's Cityscapes head) only the head
runs, on res5: ``[B, C, H/32, W/32]`` (the criterion subsamples the targets to match).
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
    """Atrous spatial pyramid pooling ``[B, C, h, w] -> [B, out_ch, h, w]``.

    The image-pooling branch is ``gelu(BN(conv1x1(avgpool(x))))`` broadcast to ``h x w`` (``pool_norm``).
    Its norm runs on the broadcast map: for a spatially constant map the batch mean and (biased) variance
    equal those of the pooled values, so the output is the same as deeplab2's BN on the 1x1 map, and a
    batch of one trains (BN refuses one value per channel); only the running variance's unbiased
    correction n / (n - 1) uses n = B*h*w instead of B. Without ``pool_norm`` the branch is a biased conv +
    GELU (this project's earlier layout).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        rates: tuple[int, ...],
        norm: NormFactory,
        dropout: float,
        pool_norm: bool = False,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList([ConvNormAct(in_ch, out_ch, norm, 1)])
        for r in rates:
            conv = nn.Conv2d(in_ch, out_ch, 3, padding=r, dilation=r, bias=False)
            self.branches.append(nn.Sequential(conv, norm(out_ch), nn.GELU()))
        self.pool = ConvNormAct(in_ch, out_ch, norm if pool_norm else None, 1, bias=not pool_norm)
        self.project = ConvNormAct(out_ch * (len(rates) + 2), out_ch, norm, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool.conv(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[-2], x.shape[-1])
        outs.append(self.pool.act(self.pool.norm(pooled)))
        return self.dropout(self.project(torch.cat(outs, dim=1)))


def _fuse(in_ch: int, out_ch: int, norm: NormFactory) -> nn.Sequential:
    return nn.Sequential(
        ConvNormAct(in_ch, in_ch, norm, FUSE_KERNEL, groups=in_ch), ConvNormAct(in_ch, out_ch, norm, 1)
    )


def _head(in_ch: int, hidden: int, out_ch: int, norm: NormFactory) -> nn.Sequential:
    """Depthwise 5x5 + BN + GELU, 1x1 + BN + GELU, 1x1 with bias (trunc-normal 0.01 init)."""
    head = nn.Sequential(
        ConvNormAct(in_ch, in_ch, norm, FUSE_KERNEL, groups=in_ch),
        ConvNormAct(in_ch, hidden, norm, 1),
        nn.Conv2d(hidden, out_ch, 1),
    )
    nn.init.trunc_normal_(head[-1].weight, std=CLASS_INIT_STD)
    nn.init.zeros_(head[-1].bias)
    return head


class SemanticHead(nn.Module):
    """``{"res2", "res3", "res5"}`` features -> semantic logits ``[B, C, h(res2), w(res2)]`` (with the
    decoder) or ``[B, C, h(res5), w(res5)]`` (without), C = K + 1 or K (see module docstring)."""

    def __init__(
        self, cfg: SemanticHeadConfig, in_channels: dict[str, int], num_classes: int, norm: NormFactory
    ):
        super().__init__()
        out_ch = num_classes + 1 if cfg.void_channel else num_classes
        self.has_decoder = cfg.decoder
        if not cfg.decoder:
            self.head = _head(in_channels["res5"], cfg.head_channels, out_ch, norm)
            return
        c = cfg.decoder_channels
        low3, low2 = cfg.low_level_channels
        self.aspp = ASPP(
            in_channels["res5"], cfg.aspp_channels, cfg.aspp_rates, norm, cfg.dropout, cfg.pool_norm
        )
        self.proj3 = ConvNormAct(in_channels["res3"], low3, norm, 1)
        self.fuse3 = _fuse(cfg.aspp_channels + low3, c, norm)
        self.proj2 = ConvNormAct(in_channels["res2"], low2, norm, 1)
        self.fuse2 = _fuse(c + low2, c, norm)
        self.head = _head(c, cfg.head_channels, out_ch, norm)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.has_decoder:
            return self.head(features["res5"])
        x = self.aspp(features["res5"])
        res3, res2 = features["res3"], features["res2"]
        x = self.fuse3(torch.cat([resize_bilinear(x, tuple(res3.shape[-2:])), self.proj3(res3)], dim=1))
        x = self.fuse2(torch.cat([resize_bilinear(x, tuple(res2.shape[-2:])), self.proj2(res2)], dim=1))
        return self.head(x)
