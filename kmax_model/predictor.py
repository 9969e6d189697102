"""The kMaX prediction head (deeplab2 "MaX-DeepLab head"): pixel embedding, mask and class logits.

Port of deeplab2 ``model/decoder/max_deeplab.py`` and bytedance/kmax-deeplab ``kMaXPredictor``
(``kmax_transformer_decoder.py`` L82-119 @ f8e1d046)::

    f      = BN(conv1x1_bias(gelu(BN(conv1x1(gelu(BN(dwconv5x5(F)))))))), then L2-normalised over channels
    kernel = BN(conv1d(mask_emb, D))                              # [B, D, N]
    mask   = BN_1ch(<f, kernel>)  (one BN channel shared by all slots, gamma init 0.1: "low temperature")
    class  = conv1d_bias(class_emb, K + 1) + [0, ..., 0, log(K * p / (1 - p))]

The void prior (p = 0.9) is a constant added at every call, not an initial bias value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kmax_model.config import HeadConfig
from kmax_model.layers import ConvNormAct, NormFactory


def void_prior_bias(num_classes: int, void_prior: float) -> float:
    """``log(K * p / (1 - p))``: with zero logits elsewhere, softmax gives void probability ``p``."""
    return math.log(num_classes * void_prior / (1.0 - void_prior))


class KMaXPredictor(nn.Module):
    """``pixel [B,C,H,W]``, ``class_emb``/``mask_emb [B,E,N]`` -> dict ``class_logits [B,N,K+1]``,
    ``mask_logits [B,N,H,W]``, ``pixel_feature [B,D,H,W]`` (unit L2 norm per pixel)."""

    def __init__(
        self, in_ch: int, emb_dim: int, num_classes: int, cfg: HeadConfig, norm: NormFactory
    ) -> None:
        super().__init__()
        d = cfg.pixel_embed_dim
        self.pixel_head = nn.Sequential(
            ConvNormAct(in_ch, in_ch, norm, cfg.kernel_size, groups=in_ch),
            ConvNormAct(in_ch, cfg.hidden_dim, norm, 1),
            ConvNormAct(cfg.hidden_dim, d, norm, 1, act=None, bias=True, init_std=cfg.class_init_std),
        )
        self.mask_kernel = ConvNormAct(emb_dim, d, norm, 1, dims=1, act=None)
        nn.init.kaiming_normal_(self.mask_kernel.conv.weight)
        self.mask_norm = norm(1, 2, cfg.mask_logit_bn_init)
        self.class_head = nn.Conv1d(emb_dim, num_classes + 1, 1)
        nn.init.trunc_normal_(self.class_head.weight, std=cfg.class_init_std)
        nn.init.zeros_(self.class_head.bias)
        void_bias = torch.zeros(num_classes + 1)
        void_bias[-1] = void_prior_bias(num_classes, cfg.void_prior)
        self.register_buffer("void_bias", void_bias, persistent=False)

    def forward(
        self, pixel: torch.Tensor, class_emb: torch.Tensor, mask_emb: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        feat = F.normalize(self.pixel_head(pixel), p=2, dim=1)  # B x D x H x W
        kernel = self.mask_kernel(mask_emb)  # B x D x N
        b, _, h, w = feat.shape
        masks = torch.einsum("bdhw,bdn->bnhw", feat, kernel)  # B x N x H x W
        masks = self.mask_norm(masks.reshape(b, 1, -1, w)).reshape(b, -1, h, w)
        logits = self.class_head(class_emb).transpose(1, 2) + self.void_bias  # B x N x (K+1)
        return {"class_logits": logits, "mask_logits": masks, "pixel_feature": feat}
