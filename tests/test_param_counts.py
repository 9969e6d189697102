"""Parameter-count parity with torchvision and with deeplab2's own kMaX test figure.

deeplab2 ``model/kmax_deeplab_test.py`` @ 64bc1c1a (config ``example_coco_kmax_meta_convnext.textproto``:
ConvNeXt-B, 133 classes + void, N = 128) asserts 121,513,304 trainable parameters excluding the
auxiliary semantic head; the ConvNeXt-B backbone test gives 87,564,416 (docs/reference_kmax.md §8).
The official PyTorch models of bytedance/kmax-deeplab @ f8e1d046 (../shared/fixtures/kmax_official_keys,
README table) have the parameter counts of our `resnet50_coco`, `convnext_tiny_coco` and
`resnet50_cityscapes` presets, auxiliary semantic head included (kmax_model.convert loads them).
Counts are taken on the meta device: the same modules and shapes, without allocating ~0.5 GB.
"""

from __future__ import annotations

import torch

from kmax_model import apply_overrides, build_model, preset
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


# (total, without the auxiliary semantic head) of the official models, fixtures README.
OFFICIAL_MODELS = {
    "resnet50_coco": (72_436_862, 56_580_120),
    "convnext_tiny_coco": (67_265_502, 60_937_080),
    "resnet50_cityscapes": (56_975_757, 56_390_778),
}
# Their ASPP image-pooling branch (``_aspp._aspp_pool``): 1x1 conv 2048 -> 256 without bias + BN (256 scales,
# 256 shifts); the biased conv of semantic_head.pool_norm=False has 256 parameters fewer.
OFFICIAL_R50_ASPP_POOL = 2048 * 256 + 2 * 256


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


def test_official_presets_have_the_official_parameter_counts():
    for name, (total, without_semantic) in OFFICIAL_MODELS.items():
        with torch.device("meta"):
            model = build_model(preset(name))
        assert (_count(model), _count(model) - _count(model.semantic_head)) == (total, without_semantic), name
    with torch.device("meta"):
        model = build_model(preset("resnet50_coco"))
    assert _count(model.semantic_head.aspp.pool) == OFFICIAL_R50_ASPP_POOL
    legacy = apply_overrides(preset("resnet50_coco"), ["semantic_head.pool_norm=false"])
    with torch.device("meta"):
        model = build_model(legacy)
    assert _count(model) == OFFICIAL_MODELS["resnet50_coco"][0] - 256
