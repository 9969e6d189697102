"""Axial attention with relative positional encodings (Axial-DeepLab), as used by kMaX's pixel decoder.

Follows deeplab2 ``model/layers/axial_layers.py`` (``AxialAttention``, ``AxialAttention2D``) and
``model/layers/positional_encodings.py`` @ 64bc1c1a: one 1x1 projection + BN to q, k, v; similarity =
BN over the three terms (q.k, q.r_q, k.r_k) per head, summed, with no 1/sqrt(d) scaling; softmax over
the keys; output = BN over (w@v, w@r_v) per head and channel, summed. Attention is global along the
axis (deeplab2's query_shape=129 branch; our implementation has no length limit).

Size independence: each relative-position table has ``2 * max_span - 1`` rows (deeplab2 MAX_SPAN = 255);
a query-key distance d indexes row ``clamp(d, -(max_span-1), max_span-1) + max_span - 1``, so axes
longer than ``max_span`` share the end rows for far pairs (the same clamping deeplab2 applies). The
model therefore runs at any input size, not only at the training crop.
"""

from __future__ import annotations

import torch
from torch import nn

from kmax_model.layers import NormFactory

NUM_SIMILARITY_TERMS = 3  # content q.k, query-rpe q.r_q, key-rpe k.r_k
NUM_RETRIEVED_TERMS = 2  # content w@v, value-rpe w@r_v


def relative_index(length: int, max_span: int, device: torch.device) -> torch.Tensor:
    """``[L, L]`` long index into a ``2 * max_span - 1`` row table: ``clamp(key - query) + max_span - 1``."""
    pos = torch.arange(length, device=device)
    dist = (pos[None, :] - pos[:, None]).clamp(-(max_span - 1), max_span - 1)
    return dist + max_span - 1


class AxialAttention1D(nn.Module):
    """Global multi-head attention along the last axis of ``x [B, C, L]`` -> ``[B, value_dim, L]``."""

    def __init__(
        self,
        in_ch: int,
        key_dim: int,
        value_dim: int,
        num_heads: int,
        norm: NormFactory,
        max_span: int,
        rpe_init_std: float = 1.0,
    ) -> None:
        super().__init__()
        if key_dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"key_dim {key_dim} and value_dim {value_dim} must be divisible by num_heads {num_heads}"
            )
        self.key_dim, self.value_dim, self.num_heads, self.max_span = key_dim, value_dim, num_heads, max_span
        self.qkv = nn.Conv1d(in_ch, 2 * key_dim + value_dim, 1, bias=False)
        nn.init.trunc_normal_(self.qkv.weight, std=in_ch**-0.5)
        self.qkv_norm = norm(2 * key_dim + value_dim, 1)
        rows = 2 * max_span - 1
        self.query_rpe = nn.Parameter(torch.empty(rows, key_dim // num_heads))
        self.key_rpe = nn.Parameter(torch.empty(rows, key_dim // num_heads))
        self.value_rpe = nn.Parameter(torch.empty(rows, value_dim // num_heads))
        for p in (self.query_rpe, self.key_rpe, self.value_rpe):
            nn.init.trunc_normal_(p, std=rpe_init_std)
        # BN over (term, head) "channels" of the similarity, and over (term, head, depth) of the output.
        self.similarity_norm = norm(NUM_SIMILARITY_TERMS * num_heads, 2)
        self.output_norm = norm(NUM_RETRIEVED_TERMS * value_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, length = x.shape
        h = self.num_heads
        qkv = self.qkv_norm(self.qkv(x))
        q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=1)
        q = q.reshape(b, h, -1, length)  # B x h x dk x L
        k = k.reshape(b, h, -1, length)
        v = v.reshape(b, h, -1, length)  # B x h x dv x L
        idx = relative_index(length, self.max_span, x.device)
        r_q = self.query_rpe[idx]  # L x M x dk
        r_k = self.key_rpe[idx]
        r_v = self.value_rpe[idx]  # L x M x dv
        content = torch.einsum("bhdl,bhdm->bhlm", q, k)
        query_pos = torch.einsum("bhdl,lmd->bhlm", q, r_q)
        key_pos = torch.einsum("bhdm,lmd->bhlm", k, r_k)
        sim = torch.stack([content, query_pos, key_pos], dim=1).reshape(
            b, NUM_SIMILARITY_TERMS * h, length, length
        )
        sim = self.similarity_norm(sim).reshape(b, NUM_SIMILARITY_TERMS, h, length, length).sum(1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            weights = torch.softmax(sim.float(), dim=-1)  # B x h x L x M, fp32 softmax
        weights = weights.to(v.dtype)
        out_content = torch.einsum("bhlm,bhdm->bhdl", weights, v)
        out_pos = torch.einsum("bhlm,lmd->bhdl", weights, r_v.to(v.dtype))
        out = torch.stack([out_content, out_pos], dim=1).reshape(
            b, NUM_RETRIEVED_TERMS * self.value_dim, length
        )
        out = self.output_norm(out).reshape(b, NUM_RETRIEVED_TERMS, self.value_dim, length).sum(1)
        return out  # B x value_dim x L


class AxialAttention2D(nn.Module):
    """Height-axis then width-axis attention on ``x [B, C, H, W]`` -> ``[B, value_dim, H, W]``."""

    def __init__(
        self,
        in_ch: int,
        key_dim: int,
        value_dim: int,
        num_heads: int,
        norm: NormFactory,
        max_span: int,
        rpe_init_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.height_axis = AxialAttention1D(
            in_ch, key_dim, value_dim, num_heads, norm, max_span, rpe_init_std
        )
        self.width_axis = AxialAttention1D(
            value_dim, key_dim, value_dim, num_heads, norm, max_span, rpe_init_std
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        cols = x.permute(0, 3, 1, 2).reshape(b * wid, c, hgt)  # (B W) x C x H
        cols = self.height_axis(cols)
        dv = cols.shape[1]
        x = cols.reshape(b, wid, dv, hgt).permute(0, 3, 2, 1)  # B x H x dv x W
        rows = x.reshape(b * hgt, dv, wid)
        rows = self.width_axis(rows)
        return rows.reshape(b, hgt, dv, wid).permute(0, 2, 1, 3).contiguous()  # B x dv x H x W
