"""Pixel-to-cluster assignment and centre update: the controlled one-axis modes of ``decoder.assignment``.

The three modes of `CONTROLLED_ASSIGNMENT_MODES` use the same affinity logits ``L [B, N, HW]``: the mask
logits of the layer's own prediction head (kMaX's choice, deeplab2 ``dual_path_transformer.py`` L405-432 @
64bc1c1a), the same values ``V`` and the same update, so an ablation changes only the normalisation axis of
the assignment ``A`` and its gradient path (and ``cluster_softmax`` adds the pixel update below):

- ``argmax`` (hard cluster-wise assignment, the k-means step of kMaX-DeepLab):
  ``A = onehot(argmax_N L)`` under no_grad (a stop-gradient, no straight-through); every pixel belongs to
  exactly one cluster.
- ``cluster_softmax`` (soft cluster-wise assignment): ``A = softmax_N(L)`` (the mask probabilities),
  differentiable; the layer additionally applies the pixel update below. Inspired by CMT-DeepLab (arXiv
  2206.08948), which describes a clustering centre update and a pixel-feature update but has no public
  code (its equations and softmax axis were not recoverable: docs/reference_cmt.md) and keeps its
  cross-attention beside the clustering update; this mode is our controlled variant, not CMT-DeepLab.
- ``spatial_softmax`` (soft spatial assignment): ``A = softmax_HW(L)``, each centre distributes a unit
  mass over the pixels: the normalisation axis of standard cross-attention, applied to the same mask
  logits (no separate query/key projections, no ``1/sqrt(d)`` scaling). The standard multi-head
  cross-attention itself is the separate ``cross_attention`` mode (kmax_model.cross_attention).

Update (all three modes): ``U = A V^T`` i.e. ``U[b, n] = sum_p A[b, n, p] V[b, :, p]`` -- a *sum*, not a
mean; the transformer layer normalises it with BN(U) then conv1d + BN(gamma 0) and adds it residually to
the centres. Assignment and update run in fp32 with autocast disabled (bytedance/kmax-deeplab does the
same).

Pixel update (``cluster_softmax`` only; our formulation, inspired by CMT-DeepLab's pixel-feature update,
arXiv 2206.08948): after the centre update, every pixel pulls back its soft centres,
``F <- F + drop_path(BN_gamma0(conv1x1(sum_n A[n, p] C'_n)))`` where ``C'`` are the layer's output centres;
the updated pixel features feed the next layer of the same stride (a new stride restarts from the pixel
decoder's map, as kMaX's pixel features are otherwise read-only).

Location-sensitive clustering (``coord_conv``, any mode; our formulation, inspired by CMT-DeepLab's
"coordinate convolution" and "dynamic reference masks"):

1. Pixel coordinates ``c(p) = (x, y)`` with ``x = (2 j + 1) / w - 1`` and ``y = (2 i + 1) / h - 1`` (pixel
   centres, in (-1, 1), `coordinate_grid`), concatenated as two extra input channels to every layer's pixel
   projection (a CoordConv 1x1: ``P = gelu(BN(conv1x1([gelu(F); c])))``), so pixel embeddings and hence the
   affinity logits can depend on position.
2. Each centre's reference mask is its predicted mask probability ``m_n = softmax_N(L)[n]`` of this layer
   (stop-gradient); its reference position is ``r_n = sum_p m_n(p) c(p) / (sum_p m_n(p) + eps)``
   (`reference_positions`).
3. The reference position is embedded by ``conv1d(2 -> d) + BN + gelu -> conv1d(d -> d) + BN(gamma 0)`` and
   added residually (with drop path) to the updated centres, so the next layer's assignment sees both where
   pixels are and where each cluster currently is. CMT-DeepLab's mask-approximation loss is not used.
"""

from __future__ import annotations

import torch

from kmax_model.config import CONTROLLED_ASSIGNMENT_MODES

REFERENCE_EPS = 1e-6


def assign_pixels(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Assignment ``A [B, N, L]`` (float32) from affinity logits ``[B, N, L]`` (N clusters, L pixels).

    ``argmax``: one-hot over N, no gradient (``requires_grad`` is False); ``cluster_softmax``: softmax
    over N; ``spatial_softmax``: softmax over L. Raises ValueError naming ``decoder.assignment`` for any other
    mode (``cross_attention`` has no pixel-to-cluster assignment: kmax_model.cross_attention).
    """
    if mode not in CONTROLLED_ASSIGNMENT_MODES:
        raise ValueError(
            f"decoder.assignment must be one of {CONTROLLED_ASSIGNMENT_MODES} here, got {mode!r}"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        if mode == "argmax":
            with torch.no_grad():
                index = logits.argmax(dim=1, keepdim=True)  # B x 1 x L
                return torch.zeros_like(logits).scatter_(1, index, 1.0)
        return torch.softmax(logits, dim=1 if mode == "cluster_softmax" else 2)


def cluster_update(assignment: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``U [B, N, C] = sum_p A[b, n, p] * V[b, :, p]`` for ``A [B, N, L]`` and ``V [B, C, L]``, in fp32."""
    with torch.autocast(device_type=values.device.type, enabled=False):
        return torch.einsum("bnl,bcl->bnc", assignment.float(), values.float())


def coordinate_grid(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``[1, 2, H, W]`` pixel-centre coordinates (x, y) in (-1, 1)."""
    ys = (2 * torch.arange(height, device=device, dtype=torch.float32) + 1) / height - 1
    xs = (2 * torch.arange(width, device=device, dtype=torch.float32) + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None]


def reference_positions(mask_logits: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``[B, N, 2]`` mask-probability-weighted mean coordinate of each cluster (no gradient).

    ``mask_logits [B, N, H, W]``, ``coords [1, 2, H, W]`` from `coordinate_grid`.
    """
    with torch.no_grad(), torch.autocast(device_type=mask_logits.device.type, enabled=False):
        probs = torch.softmax(mask_logits.float().flatten(2), dim=1)  # B x N x HW
        weighted = torch.einsum("bnl,cl->bnc", probs, coords.flatten(2)[0].float())
        return weighted / (probs.sum(-1, keepdim=True) + REFERENCE_EPS)


def hard_assignment_map(mask_logits: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` int64 cluster id per pixel (argmax over N), for per-layer assignment maps."""
    return mask_logits.detach().argmax(dim=1)
