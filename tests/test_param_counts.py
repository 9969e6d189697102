"""Parameter-count parity with torchvision and with deeplab2's own kMaX test figure.

deeplab2 ``model/kmax_deeplab_test.py`` @ 64bc1c1a (config ``example_coco_kmax_meta_convnext.textproto``:
ConvNeXt-B, 133 classes + void, N = 128) asserts 121,513,304 trainable parameters excluding the
auxiliary semantic head; the ConvNeXt-B backbone test gives 87,564,416 (docs/reference_kmax.md §8).
Counts are taken on the meta device: the same modules and shapes, without allocating ~0.5 GB.
"""

from __future__ import annotations

import torch

from kmax_model import build_model, preset
from kmax_model.backbones import build_backbone
from kmax_model.config import BackboneConfig
from kmax_model.layers import make_norm_factory

TORCHVISION_RESNET50_NO_FC = 23_508_032
DEEPLAB2_KMAX_CONVNEXT_BASE_NO_AUX_SEMANTIC = 121_513_304
DEEPLAB2_CONVNEXT_BASE_BACKBONE = 87_564_416
# Official ConvNeXt totals (fixtures README) minus the 1000-class head and the final LayerNorm.
CONVNEXT_BACKBONES = {
    "tiny": 28_589_128 - (768 * 1000 + 1000) - 2 * 768,
    "small": 50_223_688 - (768 * 1000 + 1000) - 2 * 768,
    "base": 88_591_464 - (1024 * 1000 + 1000) - 2 * 1024,
    "large": 197_767_336 - (1536 * 1000 + 1000) - 2 * 1536,
}


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_resnet50_backbone_equals_torchvision_without_fc():
    with torch.device("meta"):
        backbone = build_backbone(BackboneConfig(name="resnet50"), make_norm_factory("bn"))
    assert _count(backbone) == TORCHVISION_RESNET50_NO_FC


def test_convnext_backbones_equal_official_without_head():
    for size, expected in CONVNEXT_BACKBONES.items():
        with torch.device("meta"):
            backbone = build_backbone(BackboneConfig(name=f"convnext_{size}"), make_norm_factory("bn"))
        assert _count(backbone) == expected, size
    assert CONVNEXT_BACKBONES["base"] == DEEPLAB2_CONVNEXT_BASE_BACKBONE


def test_convnext_base_coco_matches_deeplab2_test_figure():
    with torch.device("meta"):
        model = build_model(preset("convnext_base_coco"))
    assert _count(model.backbone) == DEEPLAB2_CONVNEXT_BASE_BACKBONE
    assert _count(model) - _count(model.semantic_head) == DEEPLAB2_KMAX_CONVNEXT_BASE_NO_AUX_SEMANTIC
    # The decoder/heads part alone (121,513,304 - 87,564,416).
    assert _count(model) - _count(model.semantic_head) - _count(model.backbone) == 33_948_888
