"""KMaXDeepLab: images -> panoptic predictions (final + one auxiliary prediction per decoder layer).

Meta architecture of deeplab2 ``model/kmax_deeplab.py`` @ 64bc1c1a (docs/reference_kmax.md §1.1):
backbone -> enhanced pixel decoder -> kMaX transformer decoder on F32/F16/F8 -> final predictor on the
decoder's last map (F4),
plus the auxiliary semantic head on the backbone features in training mode.
"""

from __future__ import annotations

import torch
from torch import nn

from kmax_model.backbones import build_backbone
from kmax_model.config import KMaXConfig
from kmax_model.layers import make_norm_factory, resize_bilinear
from kmax_model.pixel_decoder import KMaXPixelDecoder
from kmax_model.predictor import KMaXPredictor
from kmax_model.semantic_head import SemanticHead
from kmax_model.transformer_decoder import KMaXTransformerDecoder

NUM_DECODER_INPUTS = 3  # F32, F16, F8 feed the transformer decoder; F4 feeds the final head


class KMaXDeepLab(nn.Module):
    """``model(images [B,3,H,W], return_assignments=False) -> dict`` (normalised images, see targets.py):

    - ``class_logits [B, N, K+1]`` (last channel void), ``mask_logits [B, N, h, w]``, ``pixel_feature
      [B, D, h, w]`` (L2-normalised) with ``h = ceil(H / 4)``, ``w = ceil(W / 4)``;
    - ``aux_outputs``: one dict with the same three keys per decoder layer, resized (bilinear,
      align_corners) to ``h, w``, plus ``reference_logits [B, N, h, w]`` in
      ``decoder.assignment = "cmt"`` with ``decoder.cmt.reference_mask`` (kmax_model.cmt);
    - ``semantic_logits [B, K+1 (or K), h', w']`` when the semantic head exists and the model is training
      (``h', w' = h, w``, or the stride-32 grid for the decoder-less head, see kmax_model.semantic_head);
    - ``assignments`` (only with ``return_assignments=True``): list over decoder layers of ``[B, h_l, w_l]``
      int64 argmax cluster ids at that layer's own stride (32, 16, 8).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pixel_decoder: KMaXPixelDecoder,
        transformer_decoder: KMaXTransformerDecoder,
        predictor: KMaXPredictor,
        semantic_head: SemanticHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.predictor = predictor
        self.semantic_head = semantic_head

    def forward(self, images: torch.Tensor, return_assignments: bool = False) -> dict:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        features = self.backbone(images)
        maps = self.pixel_decoder(features)
        class_emb, mask_emb, aux = self.transformer_decoder(maps[:NUM_DECODER_INPUTS])
        out = dict(self.predictor(maps[-1], class_emb, mask_emb))
        size = tuple(out["mask_logits"].shape[-2:])
        out["aux_outputs"] = [_aux_output(a, size) for a in aux]
        if self.semantic_head is not None and self.training:
            out["semantic_logits"] = self.semantic_head(features)
        if return_assignments:
            out["assignments"] = [a["_assignment_ids"] for a in aux]
        return out


def _aux_output(aux: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A decoder layer's public predictions, maps resized (bilinear, align_corners) to ``size``."""
    out = {
        "class_logits": aux["class_logits"],
        "mask_logits": resize_bilinear(aux["mask_logits"], size),
        "pixel_feature": resize_bilinear(aux["pixel_feature"], size),
    }
    if "reference_logits" in aux:
        out["reference_logits"] = resize_bilinear(aux["reference_logits"], size)
    return out


def build_model(cfg: KMaXConfig) -> KMaXDeepLab:
    """Build the model described by ``cfg`` (random weights; see `kmax_model.load_pretrained`)."""
    if not isinstance(cfg, KMaXConfig):
        raise TypeError(f"build_model expects a KMaXConfig, got {type(cfg).__name__}")
    norm = make_norm_factory(cfg.norm, cfg.bn_eps, cfg.bn_momentum)
    backbone = build_backbone(cfg.backbone, norm)
    pixel_decoder = KMaXPixelDecoder(cfg.pixel_decoder, backbone.channels, norm)
    transformer_decoder = KMaXTransformerDecoder(
        cfg.decoder, pixel_decoder.out_channels[:NUM_DECODER_INPUTS], cfg.head, cfg.num_classes, norm
    )
    predictor = KMaXPredictor(
        pixel_decoder.out_channels[-1], cfg.decoder.hidden_dim, cfg.num_classes, cfg.head, norm
    )
    semantic = (
        SemanticHead(cfg.semantic_head, backbone.channels, cfg.num_classes, norm)
        if cfg.semantic_head.enabled
        else None
    )
    return KMaXDeepLab(backbone, pixel_decoder, transformer_decoder, predictor, semantic)
