"""The ``cross_attention`` centre update (kmax_model.cross_attention): the block against a hand-written
per-head loop, Mask2Former's masking rules, the fp32 island under autocast, and the tiny model in that mode
(shapes, a gradient for every parameter, with and without masked attention)."""

from __future__ import annotations

import math

import pytest
import torch

from kmax_model import apply_overrides, build_model, preset
from kmax_model.clustering import assign_pixels
from kmax_model.config import ASSIGNMENT_MODES, CONTROLLED_ASSIGNMENT_MODES, TransformerDecoderConfig
from kmax_model.cross_attention import CrossAttentionUpdate, attention_mask, multi_head_cross_attention
from kmax_model.layers import make_norm_factory

pytestmark = pytest.mark.usefixtures("single_torch_thread")

B, D, KEY_DIM, HEADS, N, H, W = 2, 16, 8, 2, 5, 3, 4
THRESHOLD = 0.5
SCALE = 1.0 / math.sqrt(KEY_DIM // HEADS)


def randomise_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Random norm affines and running statistics (gamma 0 of residual branches would zero them)."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return module


def _block(masked: bool, seed: int = 0) -> CrossAttentionUpdate:
    """A block in eval mode whose norms have random affine parameters and running statistics (gamma 0 of
    the output BN would otherwise make every output 0)."""
    torch.manual_seed(seed)
    block = CrossAttentionUpdate(D, KEY_DIM, HEADS, make_norm_factory("bn"), masked, THRESHOLD)
    return randomise_norms(block).eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, N, generator=g), torch.randn(B, D, H, W, generator=g)


def _loop_reference(block: CrossAttentionUpdate, centers, pixel, mask_logits) -> tuple[torch.Tensor, ...]:
    """Explicit per-image, per-head, per-query attention with the block's projections."""
    q = block.query(centers)
    k, v = block.key(pixel).flatten(2), block.value(pixel).flatten(2)
    dh, dv, length = KEY_DIM // HEADS, D // HEADS, H * W
    probs = torch.softmax(mask_logits.flatten(2), dim=1) if mask_logits is not None else None
    out = torch.zeros(B, D, N)
    weights = torch.zeros(B, HEADS, N, length)
    for b in range(B):
        for j in range(HEADS):
            for n in range(N):
                logits = torch.stack(
                    [
                        sum(q[b, j * dh + c, n] * k[b, j * dh + c, p] for c in range(dh)) / math.sqrt(dh)
                        for p in range(length)
                    ]
                )
                if probs is not None:
                    allowed = [bool(probs[b, n, p] >= THRESHOLD) for p in range(length)]
                    if any(allowed):  # an empty mask attends everywhere
                        logits = torch.stack(
                            [lo if a else torch.tensor(float("-inf")) for lo, a in zip(logits, allowed)]
                        )
                w = torch.exp(logits - logits.max())
                w = w / w.sum()
                weights[b, j, n] = w
                for c in range(dv):
                    out[b, j * dv + c, n] = sum(w[p] * v[b, j * dv + c, p] for p in range(length))
    return out, weights, block.project(out)


@pytest.mark.parametrize("masked", [False, True])
def test_block_equals_a_per_head_loop_and_weights_sum_to_one(masked):
    block = _block(masked)
    centers, pixel = _inputs()
    mask_logits = 4.0 * torch.randn(B, N, H, W, generator=torch.Generator().manual_seed(2))
    mask_logits[0, 3] = -100.0  # query 3 of image 0: an empty mask
    with torch.no_grad():
        out, weights = block.attend(centers, pixel, mask_logits)
        branch = block(centers, pixel, mask_logits)
        ref_out, ref_weights, ref_branch = _loop_reference(
            block, centers, pixel, mask_logits if masked else None
        )
    assert out.shape == (B, D, N) and weights.shape == (B, HEADS, N, H * W) and branch.shape == (B, D, N)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(branch, ref_branch)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, HEADS, N))  # softmax over the pixels
    if masked:  # the masks really restrict: some weights are exactly 0, none of the empty-mask query's
        assert (weights == 0).any() and (weights[0, :, 3] > 0).all()


def test_one_pixel_mask_attends_only_to_it_and_an_empty_mask_attends_everywhere():
    block = _block(masked=True)
    centers, pixel = _inputs()
    pix = 7  # row 1, column 3 of the 3 x 4 map
    mask_logits = torch.zeros(B, N, H * W)
    mask_logits[:, 0, pix] = 20.0  # softmax_N: query 0 owns pixel 7 (p ~ 1), every other p is 1/N < 0.5
    mask_logits = mask_logits.reshape(B, N, H, W)
    allowed = attention_mask(mask_logits, THRESHOLD)
    assert allowed[:, 0].sum(-1).tolist() == [1, 1] and bool(allowed[:, 0, pix].all())
    assert bool(allowed[:, 1:].all())  # empty masks -> everywhere
    with torch.no_grad():
        out, weights = block.attend(centers, pixel, mask_logits)
        branch = block(centers, pixel, mask_logits)
        value = block.value(pixel).flatten(2)[:, :, pix : pix + 1]  # B x D x 1
        expected = block.project(value)[:, :, 0]
        block.masked = False
        _, unmasked = block.attend(centers, pixel)
    one_hot = torch.zeros(H * W)
    one_hot[pix] = 1.0
    assert torch.equal(weights[:, :, 0], one_hot.expand(B, HEADS, -1))
    torch.testing.assert_close(out[:, :, 0], value[:, :, 0])
    torch.testing.assert_close(branch[:, :, 0], expected)
    # a query with an empty mask has exactly the unmasked attention
    assert torch.equal(weights[:, :, 1:], unmasked[:, :, 1:])


def test_attention_is_fp32_under_bf16_autocast():
    block = _block(masked=True).train()
    centers, pixel = _inputs()
    mask_logits = 4.0 * torch.randn(B, N, H, W).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = block.query(centers), block.key(pixel).flatten(2), block.value(pixel).flatten(2)
        assert q.dtype == torch.bfloat16  # autocast is really on around the block
        allowed = attention_mask(mask_logits, THRESHOLD)
        out, weights = multi_head_cross_attention(q, k, v, HEADS, SCALE, allowed)
        branch = block(centers, pixel, mask_logits)
    assert out.dtype == weights.dtype == torch.float32
    assert branch.shape == (B, D, N) and torch.isfinite(branch.float()).all()
    # the same bf16 inputs without autocast, in fp32: identical, so nothing inside ran in bf16
    ref_out, ref_weights = multi_head_cross_attention(q.float(), k.float(), v.float(), HEADS, SCALE, allowed)
    assert torch.equal(weights, ref_weights) and torch.equal(out, ref_out)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, HEADS, N))


def _tiny(masked: bool):
    return apply_overrides(
        preset("tiny"), {"decoder.assignment": "cross_attention", "decoder.masked_attention": masked}
    )


@pytest.mark.parametrize("masked", [False, True])
def test_tiny_model_shapes_and_every_parameter_gets_a_gradient(masked):
    torch.manual_seed(0)
    cfg = _tiny(masked)
    model = build_model(cfg).train()
    layers = model.transformer_decoder.layers
    assert all(layer.cross_attention is not None and layer.pixel_value is None for layer in layers)
    seen = []
    if masked:  # sharpen the masks so that the masking really restricts the attention
        for layer in layers:
            layer.predictor.mask_norm.weight.data.fill_(10.0)
            layer.cross_attention.register_forward_hook(
                lambda mod, args, _: seen.append(attention_mask(args[2], mod.mask_threshold))
            )
    out = model(torch.randn(2, 3, 49, 65))
    n, k = cfg.decoder.num_clusters, cfg.num_classes
    assert tuple(out["class_logits"].shape) == (2, n, k + 1)
    assert tuple(out["mask_logits"].shape) == (2, n, 13, 17)
    assert len(out["aux_outputs"]) == sum(cfg.decoder.blocks_per_stride)
    tensors = [out["semantic_logits"]] + [
        pred[key]
        for pred in [out, *out["aux_outputs"]]
        for key in ("class_logits", "mask_logits", "pixel_feature")
    ]
    assert all(torch.isfinite(t).all() for t in tensors)
    sum(t.sum() for t in tensors).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if masked:
        assert len(seen) == len(layers) and any(not bool(m.all()) for m in seen)


def test_tiny_model_runs_under_bf16_autocast():
    model = build_model(_tiny(masked=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 33, 49))
    (out["mask_logits"].float().square().mean() + out["class_logits"].float().square().mean()).backward()
    assert torch.isfinite(model.transformer_decoder.cluster_centers.grad).all()


def test_parameter_count_differs_by_the_query_and_key_projections():
    """Per layer: Q and K (conv d -> key_dim, no bias, + BN) are new; V and the output path have the
    k-means update's shapes (its value projection, BN and conv + BN)."""
    cfg = preset("tiny")
    d, kd, layers = cfg.decoder.hidden_dim, cfg.decoder.key_dim, sum(cfg.decoder.blocks_per_stride)

    def count(model):
        return sum(p.numel() for p in model.parameters())

    argmax, cross = count(build_model(cfg)), count(build_model(_tiny(masked=False)))
    assert cross - argmax == layers * 2 * (d * kd + 2 * kd)


def test_modes_and_config_validation():
    assert "cross_attention" in ASSIGNMENT_MODES and "cross_attention" not in CONTROLLED_ASSIGNMENT_MODES
    assert set(CONTROLLED_ASSIGNMENT_MODES) | {"cross_attention", "cmt"} == set(ASSIGNMENT_MODES)
    with pytest.raises(
        ValueError, match=r"^decoder\.masked_attention needs decoder\.assignment=cross_attention"
    ):
        TransformerDecoderConfig(assignment="argmax", masked_attention=True)
    with pytest.raises(ValueError, match=r"^decoder\.masked_attention_threshold must be in \(0, 1\)"):
        TransformerDecoderConfig(
            assignment="cross_attention", masked_attention=True, masked_attention_threshold=1.0
        )
    with pytest.raises(ValueError, match=r"decoder\.masked_attention needs"):
        apply_overrides(preset("tiny"), ["decoder.masked_attention=true"])
    with pytest.raises(ValueError, match="decoder.assignment"):
        assign_pixels(torch.zeros(1, 2, 3), "cross_attention")
