"""The ``cross_attention`` centre update: standard multi-head cross-attention from the centres to the pixels.

The baseline of ``decoder.assignment`` against which the clustering modes (kmax_model.clustering) are
compared: the cluster centres are the queries, the pixels the keys and values, with their own projections
and a scaled dot product normalised over the pixels, as in the DETR and Mask2Former decoders. In a
`kmax_model.transformer_decoder.KMaXLayer` it replaces only the k-means update ``BN_g0(conv1d(BN(A V^T)))``;
the layer's pixel and centre projections, per-layer predictor, centre self-attention, FFN, residuals and
drop path are those of every other mode.

Inputs: centre features ``Cb [B, d, N]`` (the layer's ``gelu(BN(conv1d(C)))``, which also feeds its
predictor and self-attention) and pixel features ``P [B, d, H, W]`` (the layer's ``gelu(BN(conv1x1(F)))``).
Sizes as the layer's centre self-attention: ``h = num_heads`` heads, total key depth ``k = key_dim``
(``k / h`` per head), total value depth ``d = hidden_dim`` (``d / h`` per head). With ``L = H W`` pixels::

    Q = BN(conv1d(Cb, k))    K = BN(conv1x1(P, k))    V = BN(conv1x1(P, d))       split into h heads
    S[b, j, n, p] = <Q_j[b, :, n], K_j[b, :, p]> / sqrt(k / h)                    # [B, h, N, L]
    S[b, j, n, p] = -inf where not M[b, n, p]                                     # masked attention only
    W = softmax_p(S)                                                              # sum_p W = 1
    O[b, head j's channels, n] = sum_p W[b, j, n, p] V_j[b, :, p]                 # O [B, d, N]
    branch = BN_g0(conv1d(BN(O), d))             # the output path of kMaX's centre update (gamma 0)
    C1 = C + drop_path(branch)                   # in KMaXLayer, the residual of every mode

The logits, softmax and weighted sum run in fp32 with autocast disabled, like the assignment and update of
kmax_model.clustering (a softmax over ~10^4 pixels in bf16 loses the small weights). Projection convs use
truncated-normal init with std ``d^-0.5``, as the layer's value and self-attention projections.

Masked attention (``decoder.masked_attention``; Mask2Former, facebookresearch/Mask2Former
``mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py`` @
161be514814ea63440fae520d2ec72707b62ba54, ``forward`` and ``forward_prediction_heads``). Mask2Former
predicts masks from the queries entering a layer, keeps the pixels with mask probability ``>= 0.5``
(``attn_mask = sigmoid(mask) < 0.5`` marks the *blocked* pixels), detaches the mask, uses it for every head,
and lets a query whose mask is empty attend everywhere (``attn_mask[where(attn_mask.sum(-1) == L)] =
False``). Here the mask logits ``Lm [B, N, H, W]`` are those of the layer's per-layer predictor, computed
from the layer's input centres (the previous layer's output) at the layer's own resolution (no resize)::

    M[b, n, p] = softmax_N(Lm)[b, n, p] >= t          (t = decoder.masked_attention_threshold, 0.5)
    M[b, n, :] = True  where M[b, n, :] is all False  (an empty mask attends everywhere)

The mask probability is the softmax over the N centres, not Mask2Former's per-query sigmoid, because this
model's masks are trained and read as a softmax over the centres (PQ-style and mask-ID losses, panoptic
inference); at initialisation every probability is ~1/N, so masks start empty and the attention starts
unmasked. Not taken from Mask2Former: its positional embeddings on queries and keys (kMaX has none), its
LayerNorms (the kMaX layer's BNs are kept), its multi-scale round-robin (kMaX's layers already run per
stride).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kmax_model.layers import ConvNormAct, NormFactory


def attention_mask(mask_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Allowed pixels ``M [B, N, L]`` (bool, no gradient) from mask logits ``[B, N, H, W]`` or ``[B, N, L]``.

    ``M = softmax_N(logits) >= threshold``, then every all-False row (an empty mask) set all-True
    (Mask2Former's rule: such a query attends everywhere). Computed in fp32.
    """
    with torch.no_grad(), torch.autocast(device_type=mask_logits.device.type, enabled=False):
        probs = torch.softmax(mask_logits.detach().float().flatten(2), dim=1)
        allowed = probs >= threshold
        return allowed | ~allowed.any(dim=-1, keepdim=True)


def multi_head_cross_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    scale: float,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention of N queries over L pixels, per head, in fp32 (autocast disabled).

    ``queries [B, k, N]``, ``keys [B, k, L]``, ``values [B, dv, L]`` with ``k`` and ``dv`` divisible by
    ``h = num_heads``: head j owns channels ``[j k/h, (j+1) k/h)`` of the queries and keys and
    ``[j dv/h, (j+1) dv/h)`` of the values. ``scale``: the logit scale, ``1 / sqrt(k / h)`` for the
    standard scaled dot product (a Python float, so that tracing for export sees a constant).
    ``allowed [B, N, L]`` bool or None (every row needs a True: see `attention_mask`). Returns
    ``(O [B, dv, N], W [B, h, N, L])``, both float32, with ``W_j = softmax_L(scale * Q_j^T K_j)`` (``-inf``
    where not allowed) and ``O_j = V_j W_j^T``.
    """
    b, _, n = queries.shape
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q = queries.float().unflatten(1, (num_heads, -1))  # B x h x k/h x N
        kk = keys.float().unflatten(1, (num_heads, -1))  # B x h x k/h x L
        v = values.float().unflatten(1, (num_heads, -1))  # B x h x dv/h x L
        logits = torch.einsum("bhcn,bhcl->bhnl", q, kk) * scale
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhnl,bhcl->bhcn", weights, v).reshape(b, -1, n)
    return out, weights


class CrossAttentionUpdate(nn.Module):
    """The residual branch of the ``cross_attention`` centre update (module docstring has the equations).

    ``forward(Cb [B, d, N], P [B, d, H, W], mask_logits [B, N, H, W] | None)`` -> ``branch [B, d, N]`` in
    ``Cb``'s dtype; ``mask_logits`` is required when ``masked`` and ignored otherwise. `attend` exposes the
    attention output ``O`` and weights ``W`` (float32) before the output path `project`.
    """

    def __init__(
        self,
        hidden_dim: int,
        key_dim: int,
        num_heads: int,
        norm: NormFactory,
        masked: bool = False,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        d = hidden_dim
        if key_dim % num_heads or d % num_heads:
            raise ValueError(
                f"decoder.key_dim ({key_dim}) and decoder.hidden_dim ({d}) must be divisible by "
                f"decoder.num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(key_dim // num_heads)
        self.masked = masked
        self.mask_threshold = mask_threshold
        self.query = ConvNormAct(d, key_dim, norm, 1, dims=1, act=None, init_std=d**-0.5)
        self.key = ConvNormAct(d, key_dim, norm, 1, act=None, init_std=d**-0.5)
        self.value = ConvNormAct(d, d, norm, 1, act=None, init_std=d**-0.5)
        self.out_norm = norm(d, 1)
        self.out_proj = ConvNormAct(d, d, norm, 1, dims=1, act=None, gamma_init=0.0)

    def attend(
        self,
        centers: torch.Tensor,
        pixel: torch.Tensor,
        mask_logits: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(O [B, d, N], W [B, h, N, HW])`` in float32 for ``Cb [B, d, N]`` and ``P [B, d, H, W]``.
        ``values``: ``V [B, d, HW]`` already projected by `value` (a caller that also reads them: CMT's
        clustering branch), else projected here."""
        allowed = None
        if self.masked:
            if mask_logits is None:
                raise ValueError("decoder.masked_attention needs the layer's mask logits")
            allowed = attention_mask(mask_logits, self.mask_threshold)
        if values is None:
            values = self.value(pixel).flatten(2)
        keys = self.key(pixel).flatten(2)
        return multi_head_cross_attention(
            self.query(centers), keys, values, self.num_heads, self.scale, allowed
        )

    def project(self, attended: torch.Tensor) -> torch.Tensor:
        """The output path ``BN_g0(conv1d(BN(O)))`` of ``O [B, d, N]`` (in the dtype it is given)."""
        return self.out_proj(self.out_norm(attended))

    def forward(
        self, centers: torch.Tensor, pixel: torch.Tensor, mask_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        attended, _ = self.attend(centers, pixel, mask_logits)
        return self.project(attended.to(centers.dtype))
