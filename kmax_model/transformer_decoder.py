"""The kMaX transformer decoder: learned cluster centres refined by a stack of clustering layers.

Port of deeplab2 ``model/transformer_decoder/kmax.py`` + ``model/layers/dual_path_transformer.py``
(kMaX branch) @ 64bc1c1a and bytedance/kmax-deeplab ``kmax_transformer_decoder.py`` L123-228 @ f8e1d046.
One layer, with pixel map ``F [B, Cp, H, W]`` and centres ``C [B, d, N]`` (docs/reference_kmax.md §1.4)::

    P  = gelu(BN(conv1x1(gelu(F) [; coords])))     Cb = gelu(BN(conv1d(C)))     V = BN(conv1x1(P))
    aux = Predictor_l(P, Cb, Cb)                    # deep supervision; its mask logits are the affinities
    A  = assign(aux.mask_logits, mode);  U = A V^T  # kmax_model.clustering (fp32)
    C1 = C + drop_path(BN_g0(conv1d(BN(U))))        [+ drop_path(pos_embed(ref. positions)) if coord_conv]
    q, k, v = BN(conv1d(Cb)); O = gelu(BN(softmax_keys(BN_heads(q k^T)) v))   # centre self-attention on Cb
    C2 = gelu(C1 + drop_path(BN_g0(conv1d(O))))
    C3 = gelu(C2 + drop_path(BN_g0(conv1d(gelu(BN(conv1d(C2, ffn)))))))

``assignment == "cross_attention"`` replaces the k-means update (``V``, ``A``, ``U`` and the update's output
path) by ``C1 = C + drop_path(CrossAttentionUpdate(Cb, P, aux.mask_logits))`` (kmax_model.cross_attention:
multi-head cross-attention of the centres over the pixels with its own Q/K/V projections, optionally masked
by the predictor's masks); everything else in the layer is shared by all modes.

``assignment == "cmt"`` (CMT-DeepLab as reconstructed, kmax_model.cmt) likewise replaces only the k-means
update: ``C1 = C + CMTBranches(Cb, P, aux.mask_logits, L_prev).centre_delta`` (the cross-attention branch
plus the switchable clustering branch), the layer's supervised mask logits become the carried ``L_l``, and
after the FFN the CMT pixel update may change ``F``; the decoder hands each layer the previous layer's
``L_{l-1}``.
"""

from __future__ import annotations

import torch
from torch import nn

from kmax_model.clustering import (
    assign_pixels,
    cluster_update,
    coordinate_grid,
    hard_assignment_map,
    reference_positions,
)
from kmax_model.cmt import CMTBranches, CMTStep
from kmax_model.config import HeadConfig, TransformerDecoderConfig
from kmax_model.cross_attention import CrossAttentionUpdate
from kmax_model.layers import ConvNormAct, DropPath, NormFactory
from kmax_model.predictor import KMaXPredictor

COORD_CHANNELS = 2


class KMaXLayer(nn.Module):
    """One decoder layer. ``forward(F, C, L_prev=None)`` -> ``(C', aux prediction dict, F')`` (``F' is F``
    unless a pixel update is on: that of kmax_model.clustering with ``assignment == "cluster_softmax"``, or
    CMT's, and ``updates_pixels``). ``L_prev``: the previous layer's carried logits (``cmt`` only; the aux
    dict then has ``"_carried_logits"`` when the residual assignment is on, and ``"reference_logits"
    [B, N, H, W]`` when the reference mask is on).

    ``updates_pixels``: whether a later layer reads this layer's F'. The last layer of each stride hands its
    centres, not its pixels, to the next stride (which starts from the next pixel-decoder map), so it has
    no pixel update: a module whose output nothing reads gets no gradient, which DDP refuses."""

    def __init__(
        self,
        pixel_ch: int,
        cfg: TransformerDecoderConfig,
        head_cfg: HeadConfig,
        num_classes: int,
        norm: NormFactory,
        updates_pixels: bool = True,
    ) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.act = nn.GELU()
        extra = COORD_CHANNELS if cfg.coord_conv else 0
        self.pixel_conv = ConvNormAct(pixel_ch + extra, d, norm, 1)
        self.center_conv = ConvNormAct(d, d, norm, 1, dims=1)
        # Exactly one centre update: the k-means one (value projection + output path), cross-attention
        # (its own projections and output path) or CMT's (self.cmt, below); a module the mode does not use
        # is not built (DDP).
        kmeans = cfg.assignment not in ("cross_attention", "cmt")
        self.pixel_value = ConvNormAct(d, d, norm, 1, act=None, init_std=d**-0.5) if kmeans else None
        self.predictor = KMaXPredictor(d, d, num_classes, head_cfg, norm)
        self.update_norm = norm(d, 1) if kmeans else None
        self.update_proj = ConvNormAct(d, d, norm, 1, dims=1, act=None, gamma_init=0.0) if kmeans else None
        self.cross_attention = (
            None
            if cfg.assignment != "cross_attention"
            else CrossAttentionUpdate(
                d, cfg.key_dim, cfg.num_heads, norm, cfg.masked_attention, cfg.masked_attention_threshold
            )
        )
        self.qkv = ConvNormAct(d, 2 * cfg.key_dim + d, norm, 1, dims=1, act=None, init_std=d**-0.5)
        self.similarity_norm = norm(cfg.num_heads, 2)
        self.attn_value_norm = norm(d, 1)
        self.attn_proj = ConvNormAct(d, d, norm, 1, dims=1, act=None, gamma_init=0.0)
        self.ffn = nn.Sequential(
            ConvNormAct(d, cfg.ffn_dim, norm, 1, dims=1),
            ConvNormAct(cfg.ffn_dim, d, norm, 1, dims=1, act=None, gamma_init=0.0),
        )
        self.pos_embed = (
            nn.Sequential(
                ConvNormAct(COORD_CHANNELS, d, norm, 1, dims=1),
                ConvNormAct(d, d, norm, 1, dims=1, act=None, gamma_init=0.0),
            )
            if cfg.coord_conv
            else None
        )
        self.pixel_update = (
            ConvNormAct(d, pixel_ch, norm, 1, act=None, gamma_init=0.0)
            if cfg.assignment == "cluster_softmax" and updates_pixels
            else None
        )
        self.cmt = CMTBranches(pixel_ch, cfg, norm, updates_pixels) if cfg.assignment == "cmt" else None
        # Independent drop-path masks per residual (deeplab2), one module each for clarity.
        self.drop_update, self.drop_attn, self.drop_ffn, self.drop_pos, self.drop_pixel = (
            DropPath(cfg.drop_path_rate) for _ in range(5)
        )

    def _self_attention(self, cb: torch.Tensor) -> torch.Tensor:
        b, d, n = cb.shape
        h, kd = self.cfg.num_heads, self.cfg.key_dim
        q, k, v = torch.split(self.qkv(cb), [kd, kd, d], dim=1)
        q, k, v = (t.reshape(b, h, -1, n) for t in (q, k, v))  # B x h x dh x N
        sim = self.similarity_norm(torch.einsum("bhdn,bhdm->bhnm", q, k))  # B x h x N x N, no 1/sqrt(d)
        with torch.autocast(device_type=cb.device.type, enabled=False):
            weights = torch.softmax(sim.float(), dim=-1)
        out = torch.einsum("bhnm,bhdm->bhdn", weights.to(v.dtype), v).reshape(b, d, n)
        return self.act(self.attn_value_norm(out))

    def forward(
        self, pixel: torch.Tensor, centers: torch.Tensor, previous_logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        b, _, h, w = pixel.shape
        x = self.act(pixel)
        coords = None
        if self.cfg.coord_conv:
            coords = coordinate_grid(h, w, pixel.device)
            x = torch.cat([x, coords.to(x.dtype).expand(b, -1, -1, -1)], dim=1)
        p = self.pixel_conv(x)  # B x d x H x W
        cb = self.center_conv(centers)  # B x d x N
        aux = self.predictor(p, cb, cb)
        assignment, step = None, None
        if self.cmt is not None:
            step = self.cmt(cb, p, aux["mask_logits"], previous_logits)
            aux["mask_logits"] = step.logits
            c1 = centers + step.centre_delta
        elif self.cross_attention is not None:
            c1 = centers + self.drop_update(self.cross_attention(cb, p, aux["mask_logits"]))
        else:
            values = self.pixel_value(p).flatten(2)  # B x d x HW
            assignment = assign_pixels(aux["mask_logits"].flatten(2), self.cfg.assignment)  # B x N x HW
            # Contiguous B x d x N, the layout of bytedance's einsum: the convs below round as theirs do.
            update = cluster_update(assignment, values).transpose(1, 2).contiguous().to(centers.dtype)
            c1 = centers + self.drop_update(self.update_proj(self.update_norm(update)))
        if self.pos_embed is not None:
            ref = (
                reference_positions(aux["mask_logits"], coords).transpose(1, 2).to(centers.dtype)
            )  # B x 2 x N
            c1 = c1 + self.drop_pos(self.pos_embed(ref))
        c2 = self.act(c1 + self.drop_attn(self.attn_proj(self._self_attention(cb))))
        c3 = self.act(c2 + self.drop_ffn(self.ffn(c2)))
        if self.pixel_update is not None:
            with torch.autocast(device_type=pixel.device.type, enabled=False):
                pulled = torch.einsum("bnl,bdn->bdl", assignment, c3.float()).reshape(b, -1, h, w)
            pixel = pixel + self.drop_pixel(self.pixel_update(pulled.to(pixel.dtype)))
        if step is not None:
            pixel = self.cmt.update_pixels(pixel, step, c3)
            self._cmt_outputs(aux, step)
            aux["_assignment_ids"] = hard_assignment_map(step.assignment_logits)
        else:
            aux["_assignment_ids"] = hard_assignment_map(aux["mask_logits"])
        return c3, aux, pixel

    def _cmt_outputs(self, aux: dict[str, torch.Tensor], step: CMTStep) -> None:
        """Add the carried logits (residual assignment on) and the reference logits (reference mask on)."""
        if self.cfg.cmt.residual_assignment:
            aux["_carried_logits"] = step.logits
        if step.reference_logits is not None:
            aux["reference_logits"] = step.reference_logits


class KMaXTransformerDecoder(nn.Module):
    """``[F32, F16, F8]`` -> ``(class_emb [B,d,N], mask_emb [B,d,N], per-layer aux predictions)``.

    ``blocks_per_stride[i]`` layers run on the i-th map. Each aux dict has the predictor's three keys plus
    ``"_assignment_ids" [B, h_l, w_l]`` (argmax cluster per pixel), which the model strips or exposes, and
    in ``cmt`` mode with the reference mask on ``"reference_logits" [B, N, h_l, w_l]``. A layer's
    ``"_carried_logits"`` (``cmt`` with the residual assignment) is popped and handed to the next layer.
    """

    def __init__(
        self,
        cfg: TransformerDecoderConfig,
        pixel_channels: list[int],
        head_cfg: HeadConfig,
        num_classes: int,
        norm: NormFactory,
    ) -> None:
        super().__init__()
        if len(pixel_channels) != len(cfg.blocks_per_stride):
            raise ValueError(
                f"decoder.blocks_per_stride has {len(cfg.blocks_per_stride)} entries for "
                f"{len(pixel_channels)} pixel maps"
            )
        self.cluster_centers = nn.Parameter(torch.empty(cfg.num_clusters, cfg.hidden_dim))
        nn.init.trunc_normal_(self.cluster_centers, std=cfg.center_init_std)
        self.layers = nn.ModuleList()
        self.layer_inputs: list[int] = []
        for i, (ch, n) in enumerate(zip(pixel_channels, cfg.blocks_per_stride)):
            for j in range(n):
                self.layers.append(KMaXLayer(ch, cfg, head_cfg, num_classes, norm, updates_pixels=j < n - 1))
                self.layer_inputs.append(i)
        d = cfg.hidden_dim
        self.class_embed = ConvNormAct(d, d, norm, 1, dims=1)
        self.mask_embed = ConvNormAct(d, d, norm, 1, dims=1)

    def forward(
        self, features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
        b = features[0].shape[0]
        # A contiguous copy per image (bytedance repeats its [d, N] table): convs round as theirs do.
        centers = self.cluster_centers.t()[None].repeat(b, 1, 1).to(features[0].dtype)  # B x d x N
        aux_outputs = []
        current, pixel, carried = -1, None, None
        for layer, idx in zip(self.layers, self.layer_inputs):
            if idx != current:
                current, pixel = idx, features[idx]
            centers, aux, pixel = layer(pixel, centers, carried)
            carried = aux.pop("_carried_logits", None)
            aux_outputs.append(aux)
        return self.class_embed(centers), self.mask_embed(centers), aux_outputs
