"""Backbones: checkpoint-key parity with torchvision / official ConvNeXt, strict loading, "SAME" sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kmax_model import CheckpointMismatchError, apply_overrides, build_model, load_pretrained, preset
from kmax_model.backbones import BACKBONES, build_backbone
from kmax_model.config import BackboneConfig
from kmax_model.layers import make_norm_factory

NORM = make_norm_factory("bn")
CONVNEXT_FILES = {s: f"convnext_{s}_official.json" for s in ("tiny", "small", "base", "large")}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _shapes(path) -> dict[str, list[int]]:
    return json.loads(path.read_text())


def _meta_backbone(name: str):
    with torch.device("meta"):
        return build_backbone(BackboneConfig(name=name), NORM)


def _fake_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)
        for k, s in shapes.items()
    }


def test_resnet50_keys_match_torchvision(checkpoint_keys_dir):
    ref = {
        k: v
        for k, v in _shapes(checkpoint_keys_dir / "torchvision_resnet50.json").items()
        if not k.startswith("fc.")
    }
    own = {k: list(v.shape) for k, v in _meta_backbone("resnet50").state_dict().items()}
    assert own == ref


@pytest.mark.parametrize("size", sorted(CONVNEXT_FILES))
def test_convnext_keys_match_official_release(checkpoint_keys_dir, size):
    ref = _shapes(checkpoint_keys_dir / CONVNEXT_FILES[size])
    ref = {k: v for k, v in ref.items() if not k.startswith(("head.", "norm."))}
    own = {k: list(v.shape) for k, v in _meta_backbone(f"convnext_{size}").state_dict().items()}
    assert own == ref


def test_load_pretrained_strict_round_trip_resnet50(checkpoint_keys_dir, tmp_path):
    shapes = _shapes(checkpoint_keys_dir / "torchvision_resnet50.json")
    state = _fake_state(shapes)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)  # raw state_dict, classifier included
    # ResNet-50 backbone under the tiny decoder: the loader targets model.backbone either way.
    model = build_model(apply_overrides(preset("tiny"), ["backbone.name=resnet50"]))
    report = load_pretrained(model, path, strict=True)
    assert report.ok and sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == len(shapes) - 2
    torch.testing.assert_close(model.backbone.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
    torch.testing.assert_close(model.backbone.bn1.running_var, state["bn1.running_var"])


def test_load_pretrained_convnext_model_container_and_mismatches(checkpoint_keys_dir, tmp_path):
    shapes = _shapes(checkpoint_keys_dir / "convnext_tiny_official.json")
    state = _fake_state(shapes, seed=1)
    backbone = build_backbone(BackboneConfig(name="convnext_tiny"), NORM)
    good = tmp_path / "convnext_tiny_1k_224.pth"
    torch.save({"model": state, "epoch": 300}, good)
    report = load_pretrained(backbone, good)
    assert set(report.dropped) == {"head.weight", "head.bias", "norm.weight", "norm.bias"}
    torch.testing.assert_close(backbone.stages[2][8].gamma, state["stages.2.8.gamma"])

    broken = dict(state)
    del broken["stages.1.0.dwconv.weight"]
    broken["stages.3.2.pwconv2.weight"] = torch.zeros(5, 5)
    broken["extra.thing"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": broken}, bad)
    before = backbone.stages[0][0].dwconv.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(backbone, bad, strict=True)
    msg = str(err.value)
    assert "bad.pth" in msg and "stages.1.0.dwconv.weight" in msg and "extra.thing" in msg
    assert "stages.3.2.pwconv2.weight (checkpoint (5, 5) vs model (768, 3072))" in msg
    assert torch.equal(backbone.stages[0][0].dwconv.weight, before)  # nothing copied on a strict failure
    report = load_pretrained(backbone, bad, strict=False)
    assert report.missing == ["stages.1.0.dwconv.weight"] and report.unexpected == ["extra.thing"]
    assert [m[0] for m in report.mismatched] == ["stages.3.2.pwconv2.weight"]
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(backbone, tmp_path / "nope.pth")


@pytest.mark.parametrize("name", ["tiny", "resnet50", "convnext_tiny"])
def test_same_output_sizes_at_odd_inputs(name):
    backbone = build_backbone(BackboneConfig(name=name), NORM).eval()
    assert set(BACKBONES) >= {name}
    for h, w in ((65, 65), (97, 129)):
        with torch.no_grad():
            out = backbone(torch.randn(1, 3, h, w))
        for i, key in enumerate(("res2", "res3", "res4", "res5")):
            stride = 4 * 2**i
            assert tuple(out[key].shape) == (
                1,
                backbone.channels[key],
                math.ceil(h / stride),
                math.ceil(w / stride),
            )
            assert torch.isfinite(out[key]).all()


def test_unknown_backbone_and_norm_raise():
    cfg = BackboneConfig()
    object.__setattr__(cfg, "name", "vgg")
    with pytest.raises(ValueError, match="backbone.name 'vgg' is unknown"):
        build_backbone(cfg, NORM)
    with pytest.raises(ValueError, match="norm must be 'bn' or 'gn'"):
        make_norm_factory("ln")
