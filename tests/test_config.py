"""Typed model configs, presets with the reference values, and the generic dotted-override utilities."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kmax_model import PRESET_NAMES, KMaXConfig, preset
from kmax_model.config import TransformerDecoderConfig
from kmax_model.config_utils import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_yaml,
    save_yaml,
)


@dataclass
class Wrapper:
    """A training-style top config nesting the model config under ``model``."""

    model: KMaXConfig = field(default_factory=lambda: preset("tiny"))
    steps: int = 10
    note: str | None = None


def test_presets_carry_reference_values():
    for name in PRESET_NAMES:
        assert isinstance(preset(name), KMaXConfig)
    coco = preset("resnet50_coco")
    assert coco.num_classes == 133 and coco.output_stride == 4
    d = coco.decoder
    assert (d.num_clusters, d.hidden_dim, d.key_dim, d.num_heads, d.ffn_dim) == (128, 256, 128, 8, 2048)
    assert d.blocks_per_stride == (2, 2, 2) and d.drop_path_rate == 0.2 and d.assignment == "argmax"
    assert coco.pixel_decoder.dims == (512, 256, 128, 64) and coco.pixel_decoder.num_blocks == (1, 5, 1, 1)
    assert coco.pixel_decoder.block_types == ("axial", "axial", "bottleneck", "bottleneck")
    assert coco.pixel_decoder.max_span == 255 and coco.head.pixel_embed_dim == 128
    assert coco.bn_eps == 1e-3 and coco.bn_momentum == 0.01
    pp = coco.postprocess
    assert (pp.thing_threshold, pp.stuff_threshold, pp.overlap_threshold) == (0.7, 0.5, 0.8)
    city = preset("resnet50_cityscapes")
    assert city.num_classes == 19 and city.decoder.num_clusters == 256
    assert (city.postprocess.thing_threshold, city.postprocess.stuff_threshold) == (0.5, 0.3)
    assert city.postprocess.overlap_threshold == 0.9
    rates = {
        s: preset(f"convnext_{s}_coco").backbone.drop_path_rate for s in ("tiny", "small", "base", "large")
    }
    assert rates == {"tiny": 0.3, "small": 0.4, "base": 0.5, "large": 0.6}
    assert preset("convnext_large_coco").backbone.name == "convnext_large"
    tiny = preset("tiny")
    assert tiny.backbone.name == "tiny" and tiny.decoder.drop_path_rate == 0.0
    assert tiny.postprocess.stuff_area_limit == 0
    assert preset("tiny") is not preset("tiny")  # fresh objects, no shared mutable state
    with pytest.raises(ValueError, match="unknown preset 'r101'"):
        preset("r101")


def test_validation_names_the_field():
    with pytest.raises(ValueError, match=r"decoder\.num_clusters must be > 0"):
        TransformerDecoderConfig(num_clusters=0)
    with pytest.raises(ValueError, match=r"decoder\.drop_path_rate"):
        TransformerDecoderConfig(drop_path_rate=1.5)
    with pytest.raises(ValueError, match=r"decoder\.key_dim"):
        TransformerDecoderConfig(key_dim=30, num_heads=8)
    with pytest.raises(ConfigError, match=r"^model\.decoder\.num_clusters must be > 0"):
        config_from_dict(Wrapper, {"model": {"decoder": {"num_clusters": -3}}})
    with pytest.raises(ConfigError, match=r"model\.pixel_decoder\.dims\[1\]"):
        apply_overrides(Wrapper(), ["model.pixel_decoder.dims=(32,0,16,16)"])


def test_overrides_coerce_strings_and_return_a_new_config():
    base = Wrapper()
    cfg = apply_overrides(
        base,
        [
            "model.decoder.assignment=cluster_softmax",
            "model.decoder.blocks_per_stride=(1,2,3)",
            "model.decoder.coord_conv=true",
            "model.head.void_prior=0.8",
            "model.backbone.pretrained=/ckpt/r50.pth",
            "steps=7",
        ],
    )
    assert cfg.model.decoder.assignment == "cluster_softmax"
    assert cfg.model.decoder.blocks_per_stride == (1, 2, 3)
    assert cfg.model.decoder.coord_conv is True and cfg.model.head.void_prior == 0.8
    assert cfg.model.backbone.pretrained == "/ckpt/r50.pth" and cfg.steps == 7
    assert base.model.decoder.assignment == "argmax" and base.steps == 10  # input untouched
    cfg2 = apply_overrides(
        cfg, {"model.decoder.blocks_per_stride": "3,3,3", "model.backbone.pretrained": "none"}
    )
    assert cfg2.model.decoder.blocks_per_stride == (3, 3, 3) and cfg2.model.backbone.pretrained is None
    cfg3 = apply_overrides(cfg, {"model.decoder.num_clusters": 64, "model.decoder.coord_conv": "0"})
    assert cfg3.model.decoder.num_clusters == 64 and cfg3.model.decoder.coord_conv is False


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("model.decoder.foo=1", r"model\.decoder\.foo"),
        ("model.nope.x=1", r"model\.nope"),
        ("model.decoder.assignment=kmeans", r"model\.decoder\.assignment: 'kmeans' is not one of"),
        ("model.decoder.num_clusters=abc", r"model\.decoder\.num_clusters: expected an int"),
        ("model.decoder.num_clusters=2.5", r"model\.decoder\.num_clusters: expected an int"),
        ("model.decoder.coord_conv=maybe", r"model\.decoder\.coord_conv: expected a bool"),
        ("model.decoder.blocks_per_stride=(2,2)", r"model\.decoder\.blocks_per_stride: expected 3 items"),
        ("model.head.void_prior=x", r"model\.head\.void_prior: expected a float"),
        ("steps", r"dotted\.path=value"),
    ],
)
def test_bad_overrides_raise_naming_the_path(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(Wrapper(), [override])


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Wrapper(), ["model.decoder.coord_conv=true", "note=hello"])
    data = config_to_dict(cfg)
    assert data["model"]["decoder"]["blocks_per_stride"] == [2, 2, 2]  # tuples become lists
    assert config_from_dict(Wrapper, data) == cfg
    path = save_yaml(cfg, tmp_path / "sub" / "cfg.yaml")
    assert load_yaml(Wrapper, path) == cfg
    (tmp_path / "partial.yaml").write_text("model:\n  decoder:\n    num_clusters: 16\n")
    partial = load_yaml(Wrapper, tmp_path / "partial.yaml")
    assert partial.model.decoder.num_clusters == 16 and partial.steps == 10
    (tmp_path / "bad.yaml").write_text("model:\n  decoder:\n    bogus: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.decoder\.bogus"):
        load_yaml(Wrapper, tmp_path / "bad.yaml")
    for name in PRESET_NAMES:  # every preset survives the dict round trip (H2's objective configs included)
        assert config_from_dict(KMaXConfig, config_to_dict(preset(name))) == preset(name)
