"""``decoder.assignment = "cmt"``: CMT-DeepLab's layer as reconstructed (not a reproduction).

CMT-DeepLab (Yu et al., CVPR 2022, arXiv 2206.08948) has no public code, and its method section (§3), its
equations and its ablation tables could not be read (docs/reference_cmt.md: only the abstract, the Fig. 1
and Fig. 4 captions, a third-party review, the first author's reply in google-research/deeplab2 issue #119
and a blog post). Every component below is one the public text *names*; every formula is ours, built from
the closest public code: deeplab2 ``model/layers/dual_path_transformer.py`` @ 64bc1c1a
(L405-432, L567-618: a k-means branch summed with the original cross-attention branch, both with their own
output BN and projection; docs/reference_cmt.md §4.4).
Call a model built with this mode "CMT-DeepLab as reconstructed".

One layer, in a `kmax_model.transformer_decoder.KMaXLayer` (pixel map ``F [B, Cp, H, W]``, centres
``C [B, d, N]``, ``L = H W`` pixels, ``c(p) = (x, y)`` the pixel-centre coordinates in (-1, 1) of
`kmax_model.clustering.coordinate_grid`). Shared with every mode: ``P = gelu(BN(conv1x1(gelu(F))))``
``[B, d, H, W]``, ``Cb = gelu(BN(conv1d(C)))`` ``[B, d, N]``, the per-layer predictor whose mask logits
are ``M_l [B, N, H, W]``, the centre self-attention and the FFN. The CMT part (switches of
`kmax_model.config.CMTConfig`; everything in fp32 with autocast disabled)::

    (2) residual assignment  L_l = M_l + resize(L_{l-1})          (L_l = M_l when off, or in the first layer)
    (4) reference mask       E   = gelu(conv1x1(gelu(conv1x1(c, r)), r))             [r, H, W]  CoordConv MLP
                             K   = conv1d(Cb, r)                                      [B, r, N]
                             R_l = BN_1ch(sum_j K[b, j, n] E[j, p])                   [B, N, H, W]
                             S_l = L_l + R_l                  (S_l = L_l when off)     location-sensitive
    assignment               A   = softmax_N(S_l / tau)                              [B, N, L], sum_n A = 1
    (orig.) cross-attention  O   = MHA(Q = Cb, K = P, V = V_p),  V_p = BN(conv1x1(P))  (cross_attention.py)
                             C1  = C + dp(BN_g0(conv1d(BN(O))))
    (1) centre update        U[b, n] = sum_p A[b, n, p] V_p[b, :, p]                  [B, N, d]  (A V^T)
                             C1 += dp(BN_g0(conv1d(BN(U))))                          second residual branch
    (centre self-attention and FFN: C3 from C1, as every mode)
    (3) pixel update         V_c = conv1d(C3, Cp)                                     [B, Cp, N]
                             F  <- F + dp(BN_g0(sum_n A[b, n, p] V_c[b, :, n]  [+ conv1x1(c, Cp)]))
                             (the coordinate term only with (4) on and ``pixel_update_coords``)

The deep-supervised mask logits of the layer are ``L_l`` (so with (2) on, every layer is supervised on the
accumulated logits); ``R_l`` is returned as ``reference_logits`` and trained by the mask-approximation
loss (5) of kmax_model.losses (`mask_approximation_loss`, ``loss.mask_approx_weight``), matched by the
same Hungarian match as the mask losses. Projecting the centres first (``V_c = conv1d(C3)``, at N
positions) equals a 1x1 conv of the pulled centres ``sum_n A C3`` (at L positions): both are linear; with
the coordinate term the whole is a CoordConv 1x1 of ``[sum_n A C3; c]``.

Our choices (docs/reference_cmt.md §5 lists the open decisions; each is a `CMTConfig` field unless said):

- Assignment axis: softmax over the N clusters (§5.1), the normalisation of the final mask probabilities,
  which is the "inconsistency" the paper names; temperature ``tau = assignment_temperature`` (1.0: the
  mask probabilities themselves). ``A`` is differentiable (``detach_assignment`` False): the paper calls
  the clustering soft, and kMaX's stop-gradient belongs to its hard argmax.
- Affinity: the layer's own predictor mask logits (kMaX's choice, deeplab2 L405-423), not a separate
  Q K^T: the assignment is then the supervised mask prediction (not a field: a different affinity would be
  another model).
- Residual path (§5.2 a): the logits before the softmax are summed, not the probabilities; the previous
  layer's logits are resized bilinearly with align_corners (this project's resize convention,
  `kmax_model.layers.resize_bilinear`) when the stride changes; the gradient flows through the sum; the
  final predictor (on F4) is not a CMT layer and gets no residual (not fields).
- Centre update (§5.3): the clustering branch is an unnormalised sum ``A V^T`` like kMaX's
  (``centre_update_norm = "sum"``; ``"mass"`` divides by ``sum_p A``), normalised by BN, summed with the
  cross-attention branch as deeplab2's dual-path layer sums its two branches, each with its own output BN
  and projection and its own drop-path mask; the branches share the pixel value projection ``V_p``
  (``share_value`` True, as in deeplab2 L567-618). The original cross-attention is always on (CMT adds to
  it, GH119), unmasked as in MaX-DeepLab.
- Pixel update (§5.4): it reuses the same ``A``; ``V_c`` is a projection of the layer's *output* centres
  ``C3`` (the freshest centres, as the ``cluster_softmax`` mode's pixel update); gamma 0 so the layer
  starts as the identity on the pixels; a stride's last layer has no pixel update (nothing reads it: DDP).
- Reference mask and coordinates (§5.5): a mask logit map per centre, from a dynamic kernel predicted by
  the centre (``conv1d(Cb)``) applied to an embedding of the coordinate grid only (a 2-layer CoordConv MLP of
  ``reference_dim`` channels, 32): a learned location prior that depends on position, not appearance. It
  enters the clustering by adding ``R_l`` to the assignment logits (not to the carried or supervised
  logits), and the coordinates enter the pixel update as two CoordConv channels (``pixel_update_coords``).
  ``R_l`` has a one-channel BN like the predictor's mask logits, gamma ``reference_logit_bn_init`` (0.1,
  the predictor's value) so that it starts as a weak prior.
- Mask-approximation loss (§5.6; kmax_model.losses): sigmoid per centre (reference masks of different
  centres may overlap), dice + BCE over non-void pixels (``loss.mask_approx_terms``), matched centres only,
  on every layer's reference mask resized to the output grid, weight ``loss.mask_approx_weight`` (1.0).
- Not built: CMT-DeepLab's pixel-wise instance discrimination loss is the existing ``loss.insdis_*`` term
  (deeplab2 code, §4.1), on in every mode; MaX-DeepLab's dual-path backbone is not used (see the
  ``cmt_resnet50_coco`` preset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kmax_model.clustering import cluster_update, coordinate_grid
from kmax_model.config import CMTConfig, TransformerDecoderConfig
from kmax_model.cross_attention import CrossAttentionUpdate
from kmax_model.layers import ConvNormAct, DropPath, NormFactory, resize_bilinear

COORD_CHANNELS = 2
CLUSTER_MASS_EPS = 1e-6
"""Added to the cluster mass ``sum_p A`` when ``centre_update_norm = "mass"`` (an empty cluster)."""


def residual_logits(logits: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``L_l = M_l + resize(L_{l-1})`` in fp32: ``logits [B, N, H, W]``, ``previous [B, N, h, w]`` or None
    (then ``M_l`` itself, as float32). The resize is bilinear with align_corners (a no-op at equal sizes)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        if previous is None:
            return logits
        return logits + resize_bilinear(previous.float(), tuple(logits.shape[-2:]))


def soft_assignment(logits: torch.Tensor, temperature: float, detach: bool) -> torch.Tensor:
    """``A = softmax_N(logits / temperature)`` ``[B, N, L]`` (float32) from ``logits [B, N, H, W]``."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float().flatten(2)
        if detach:
            logits = logits.detach()
        return torch.softmax(logits / temperature, dim=1)


def centre_update_sum(assignment: torch.Tensor, values: torch.Tensor, norm: str) -> torch.Tensor:
    """``U [B, N, C]`` (float32) from ``A [B, N, L]`` and ``V [B, C, L]``: ``sum_p A V`` ("sum") or that
    divided by the cluster mass ``sum_p A + eps`` ("mass")."""
    update = cluster_update(assignment, values)
    if norm == "mass":
        with torch.autocast(device_type=values.device.type, enabled=False):
            update = update / (assignment.float().sum(-1, keepdim=True) + CLUSTER_MASS_EPS)
    return update


def pull_to_pixels(assignment: torch.Tensor, centre_values: torch.Tensor) -> torch.Tensor:
    """``X[b, :, p] = sum_n A[b, n, p] V_c[b, :, n]`` ``[B, C, L]`` (float32) for ``A [B, N, L]`` and
    ``V_c [B, C, N]``."""
    with torch.autocast(device_type=assignment.device.type, enabled=False):
        return torch.einsum("bnl,bcn->bcl", assignment.float(), centre_values.float())


@dataclass
class CMTStep:
    """What the centre side of a CMT layer hands to the rest of the layer.

    Attributes:
        centre_delta: [B, d, N] the summed residual branches (cross-attention [+ clustering]), drop-pathed.
        logits: [B, N, H, W] float32 ``L_l``, the layer's supervised mask logits (and the carried ones).
        assignment_logits: [B, N, H, W] float32 ``S_l = L_l [+ R_l]`` (argmax = the layer's assignment map).
        assignment: [B, N, L] float32 ``A``, or None when neither update reads it.
        reference_logits: [B, N, H, W] float32 ``R_l``, or None without the reference mask.
        coords: [1, 2, H, W] the coordinate grid, or None without the reference mask.
    """

    centre_delta: torch.Tensor
    logits: torch.Tensor
    assignment_logits: torch.Tensor
    assignment: torch.Tensor | None
    reference_logits: torch.Tensor | None
    coords: torch.Tensor | None


class ReferenceMask(nn.Module):
    """``R [B, N, H, W]`` (float32) = ``BN_1ch(<K_n, E(p)>)`` with ``K = conv1d(Cb, r)`` and
    ``E = gelu(conv1x1(gelu(conv1x1(c, r)), r))`` on the coordinate grid ``c [1, 2, H, W]``."""

    def __init__(self, hidden_dim: int, cfg: CMTConfig, norm: NormFactory) -> None:
        super().__init__()
        r = cfg.reference_dim
        self.coord_embed = nn.Sequential(
            nn.Conv2d(COORD_CHANNELS, r, 1), nn.GELU(), nn.Conv2d(r, r, 1), nn.GELU()
        )
        self.kernel = nn.Conv1d(hidden_dim, r, 1, bias=False)
        self.logit_norm = norm(1, 2, cfg.reference_logit_bn_init)

    def forward(self, centers: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        b = centers.shape[0]
        with torch.autocast(device_type=centers.device.type, enabled=False):
            embed = self.coord_embed(coords.float())[0]  # r x H x W
            kernel = self.kernel(centers.float())  # B x r x N
            logits = torch.einsum("rhw,brn->bnhw", embed, kernel)
            h, w = logits.shape[-2:]
            return self.logit_norm(logits.reshape(b, 1, -1, w)).reshape(b, -1, h, w)


class CMTBranches(nn.Module):
    """The CMT-specific parts of one layer (module docstring). Modules of a switched-off component are not
    built (DDP needs a gradient for every parameter).

    ``forward(Cb [B, d, N], P [B, d, H, W], M_l [B, N, H, W], L_{l-1} | None)`` -> `CMTStep`;
    ``update_pixels(F [B, Cp, H, W], step, C3 [B, d, N])`` -> ``F'`` (``F`` itself without a pixel update).
    """

    def __init__(
        self, pixel_ch: int, cfg: TransformerDecoderConfig, norm: NormFactory, updates_pixels: bool
    ) -> None:
        super().__init__()
        d, self.cfg = cfg.hidden_dim, cfg.cmt
        self.cross_attention = CrossAttentionUpdate(d, cfg.key_dim, cfg.num_heads, norm)
        self.drop_attention, self.drop_cluster, self.drop_pixel = (
            DropPath(cfg.drop_path_rate) for _ in range(3)
        )
        self.reference = ReferenceMask(d, cfg.cmt, norm) if cfg.cmt.reference_mask else None
        clustering = cfg.cmt.centre_update
        own_value = clustering and not cfg.cmt.share_value
        self.value = ConvNormAct(d, d, norm, 1, act=None, init_std=d**-0.5) if own_value else None
        self.update_norm = norm(d, 1) if clustering else None
        self.update_proj = (
            ConvNormAct(d, d, norm, 1, dims=1, act=None, gamma_init=0.0) if clustering else None
        )
        pixels = cfg.cmt.pixel_update and updates_pixels
        coords = pixels and cfg.cmt.reference_mask and cfg.cmt.pixel_update_coords
        self.pixel_value = nn.Conv1d(d, pixel_ch, 1, bias=False) if pixels else None
        self.pixel_coord = nn.Conv2d(COORD_CHANNELS, pixel_ch, 1, bias=False) if coords else None
        self.pixel_norm = norm(pixel_ch, 2, 0.0) if pixels else None

    def forward(
        self,
        centers: torch.Tensor,
        pixel: torch.Tensor,
        mask_logits: torch.Tensor,
        previous_logits: torch.Tensor | None = None,
    ) -> CMTStep:
        logits = residual_logits(mask_logits, previous_logits if self.cfg.residual_assignment else None)
        scores, reference, coords = logits, None, None
        if self.reference is not None:
            coords = coordinate_grid(*pixel.shape[-2:], device=pixel.device)
            reference = self.reference(centers, coords)
            scores = logits + reference
        needs_assignment = self.update_proj is not None or self.pixel_value is not None
        assignment = (
            soft_assignment(scores, self.cfg.assignment_temperature, self.cfg.detach_assignment)
            if needs_assignment
            else None
        )
        delta = self._centre_delta(centers, pixel, assignment)
        return CMTStep(delta, logits, scores, assignment, reference, coords)

    def _centre_delta(
        self, centers: torch.Tensor, pixel: torch.Tensor, assignment: torch.Tensor | None
    ) -> torch.Tensor:
        """Cross-attention branch [+ clustering branch], each drop-pathed, ``[B, d, N]``."""
        ca = self.cross_attention
        values = ca.value(pixel).flatten(2)  # B x d x L, shared with the clustering branch
        attended, _ = ca.attend(centers, pixel, values=values)
        delta = self.drop_attention(ca.project(attended.to(centers.dtype)))
        if self.update_proj is None:
            return delta
        if self.value is not None:
            values = self.value(pixel).flatten(2)
        update = centre_update_sum(assignment, values, self.cfg.centre_update_norm)  # B x N x d
        update = update.transpose(1, 2).contiguous().to(centers.dtype)
        return delta + self.drop_cluster(self.update_proj(self.update_norm(update)))

    def update_pixels(self, pixel: torch.Tensor, step: CMTStep, centers: torch.Tensor) -> torch.Tensor:
        """``F + dp(BN_g0(A^T conv1d(C3) [+ conv1x1(c)]))`` (fp32 inside), or ``F`` without a pixel update."""
        if self.pixel_value is None:
            return pixel
        b, _, h, w = pixel.shape
        with torch.autocast(device_type=pixel.device.type, enabled=False):
            pulled = pull_to_pixels(step.assignment, self.pixel_value(centers.float())).reshape(b, -1, h, w)
            if self.pixel_coord is not None:
                pulled = pulled + self.pixel_coord(step.coords.float())
            update = self.pixel_norm(pulled)
        return pixel + self.drop_pixel(update.to(pixel.dtype))
