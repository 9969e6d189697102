"""End-to-end model contract on CPU: output shapes, finiteness, gradients, per-layer assignments.

The full ablation matrix (assignment mode x coord_conv x decoder depth) runs forward + backward on the
tiny preset at odd, non-square inputs (65x65 and 97x129, "SAME" grid ceil(H / 4)).
"""

from __future__ import annotations

import math

import pytest
import torch

from kmax_model import apply_overrides, build_model, preset
from kmax_model.predictor import void_prior_bias

SIZES = ((65, 65), (97, 129))
KEYS = ("class_logits", "mask_logits", "pixel_feature")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _tiny(**overrides):
    return apply_overrides(preset("tiny"), {f"decoder.{k}": v for k, v in overrides.items()})


def _loss(out: dict) -> torch.Tensor:
    total = out["semantic_logits"].square().mean()
    for pred in [out, *out["aux_outputs"]]:
        total = total + pred["class_logits"].square().mean() + pred["mask_logits"].square().mean()
        total = total + pred["pixel_feature"].mean()
    return total


@pytest.mark.parametrize("depth", [(1, 1, 1), (2, 2, 2), (3, 3, 3)])
@pytest.mark.parametrize("coord_conv", [False, True])
@pytest.mark.parametrize("assignment", ["argmax", "cluster_softmax", "spatial_softmax", "cross_attention"])
def test_forward_backward_matrix(assignment, coord_conv, depth):
    torch.manual_seed(0)
    cfg = _tiny(assignment=assignment, coord_conv=coord_conv, blocks_per_stride=depth)
    model = build_model(cfg).train()
    n, k, d = cfg.decoder.num_clusters, cfg.num_classes, cfg.head.pixel_embed_dim
    for height, width in SIZES:
        model.zero_grad()
        out = model(torch.randn(2, 3, height, width), return_assignments=True)
        h, w = math.ceil(height / 4), math.ceil(width / 4)
        assert tuple(out["class_logits"].shape) == (2, n, k + 1)
        assert tuple(out["mask_logits"].shape) == (2, n, h, w)
        assert tuple(out["pixel_feature"].shape) == (2, d, h, w)
        assert tuple(out["semantic_logits"].shape) == (2, k + 1, h, w)
        assert len(out["aux_outputs"]) == sum(depth) == len(out["assignments"])
        for aux in out["aux_outputs"]:
            assert set(aux) == set(KEYS)
            assert tuple(aux["mask_logits"].shape) == (2, n, h, w)
            assert tuple(aux["pixel_feature"].shape) == (2, d, h, w)
            assert tuple(aux["class_logits"].shape) == (2, n, k + 1)
        strides = [32] * depth[0] + [16] * depth[1] + [8] * depth[2]
        for ids, s in zip(out["assignments"], strides):
            assert ids.dtype == torch.int64 and tuple(ids.shape) == (
                2,
                math.ceil(height / s),
                math.ceil(width / s),
            )
            assert int(ids.min()) >= 0 and int(ids.max()) < n
        for key in KEYS:
            assert torch.isfinite(out[key]).all()
        torch.testing.assert_close(out["pixel_feature"].norm(dim=1), torch.ones(2, h, w))
        _loss(out).backward()
        # every parameter takes part in every mode (DDP refuses a parameter without gradient)
        assert [name for name, p in model.named_parameters() if p.grad is None] == []
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        centers = model.transformer_decoder.cluster_centers.grad
        assert centers is not None and centers.abs().sum() > 0


def test_default_output_dict_and_eval_mode():
    model = build_model(preset("tiny"))
    out = model(torch.randn(1, 3, 64, 96))
    assert set(out) == {"class_logits", "mask_logits", "pixel_feature", "aux_outputs", "semantic_logits"}
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert set(out) == {"class_logits", "mask_logits", "pixel_feature", "aux_outputs"}
    assert tuple(out["mask_logits"].shape[-2:]) == (16, 24)
    no_sem = build_model(apply_overrides(preset("tiny"), ["semantic_head.enabled=false"]))
    assert no_sem.semantic_head is None and "semantic_logits" not in no_sem(torch.randn(1, 3, 33, 33))


def test_void_prior_is_added_at_every_call():
    cfg = preset("tiny")
    model = build_model(cfg).eval()
    for layer_head in [model.predictor] + [layer.predictor for layer in model.transformer_decoder.layers]:
        torch.nn.init.zeros_(layer_head.class_head.weight)
        torch.nn.init.zeros_(layer_head.class_head.bias)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 33))
    k = cfg.num_classes
    assert math.isclose(void_prior_bias(k, 0.9), math.log(k * 9.0))
    for pred in [out, *out["aux_outputs"]]:
        probs = pred["class_logits"].softmax(-1)
        torch.testing.assert_close(probs[..., -1], torch.full(probs.shape[:-1], 0.9))
        torch.testing.assert_close(probs[..., :-1], torch.full(probs.shape[:-1] + (k,), 0.1 / k))


def test_axes_longer_than_the_position_table_and_gn_norm():
    cfg = apply_overrides(preset("tiny"), ["pixel_decoder.max_span=2", "norm=gn"])
    out = build_model(cfg)(torch.randn(1, 3, 97, 129))
    assert tuple(out["mask_logits"].shape) == (1, cfg.decoder.num_clusters, 25, 33)
    assert torch.isfinite(out["mask_logits"]).all()


def test_convnext_base_coco_shapes_like_deeplab2_test():
    """deeplab2 kmax_deeplab_test: ConvNeXt-B COCO at 65x65 -> class [2,128,134], masks/features 17x17."""
    model = build_model(preset("convnext_base_coco")).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 65, 65))
    assert tuple(out["class_logits"].shape) == (2, 128, 134)
    assert tuple(out["mask_logits"].shape) == (2, 128, 17, 17)
    assert tuple(out["pixel_feature"].shape) == (2, 128, 17, 17)
    assert tuple(out["semantic_logits"].shape) == (2, 134, 17, 17)
    assert len(out["aux_outputs"]) == 6 and all(torch.isfinite(out[k]).all() for k in KEYS)


@pytest.mark.parametrize("assignment", ["argmax", "cluster_softmax", "cross_attention"])
def test_runs_under_bf16_autocast_with_fp32_clustering(assignment):
    model = build_model(_tiny(assignment=assignment, coord_conv=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 49, 65))
    _loss(out).float().backward()
    assert torch.isfinite(out["mask_logits"].float()).all()
    assert torch.isfinite(model.transformer_decoder.cluster_centers.grad).all()
