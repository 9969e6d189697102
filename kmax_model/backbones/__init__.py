"""Pixel encoders. `BACKBONES` is a plain dict ``name -> builder(cfg: BackboneConfig, norm) -> nn.Module``.

Every backbone maps ``[B, 3, H, W]`` to ``{"res2", "res3", "res4", "res5"}`` at strides 4, 8, 16, 32
("SAME" sizes ceil(H / s)) plus ``"stem"`` (the stem's output, stride 4, read by bytedance's Cityscapes
pixel decoder), exposes ``channels: dict[str, int]`` and ``classifier_prefixes`` (the
checkpoint keys `kmax_model.pretrained.load_pretrained` drops).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kmax_model.backbones.convnext import build_convnext
from kmax_model.backbones.resnet import ResNet50
from kmax_model.backbones.tiny import TinyBackbone
from kmax_model.config import BackboneConfig
from kmax_model.layers import NormFactory


def _resnet50(cfg: BackboneConfig, norm: NormFactory) -> nn.Module:
    # Backbone BNs are always BatchNorm (torchvision key parity needs running stats), with the config's eps.
    return ResNet50(NormFactory("bn", norm.eps, norm.momentum))


def _convnext(size: str) -> Callable[[BackboneConfig, NormFactory], nn.Module]:
    def build(cfg: BackboneConfig, norm: NormFactory) -> nn.Module:
        return build_convnext(size, cfg.drop_path_rate)

    return build


def _tiny(cfg: BackboneConfig, norm: NormFactory) -> nn.Module:
    return TinyBackbone(cfg.tiny_stem_width, cfg.tiny_widths, cfg.tiny_blocks, norm)


BACKBONES: dict[str, Callable[[BackboneConfig, NormFactory], nn.Module]] = {
    "resnet50": _resnet50,
    "convnext_tiny": _convnext("tiny"),
    "convnext_small": _convnext("small"),
    "convnext_base": _convnext("base"),
    "convnext_large": _convnext("large"),
    "tiny": _tiny,
}


def build_backbone(cfg: BackboneConfig, norm: NormFactory) -> nn.Module:
    """Build the backbone named ``cfg.name`` (raises naming ``backbone.name`` when unknown)."""
    if cfg.name not in BACKBONES:
        raise ValueError(f"backbone.name {cfg.name!r} is unknown; known: {sorted(BACKBONES)}")
    return BACKBONES[cfg.name](cfg, norm)
