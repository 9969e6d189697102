"""Each loss term against a hand-computed / independent numpy value on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kmax_model.losses import (
    SOFTMAX_MASKING_CONSTANT,
    gumbel_topk,
    instance_discrimination_loss,
    mask_id_loss,
    pq_class_loss,
    pq_dice_loss,
    semantic_loss,
    small_object_sampling_logits,
)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_pq_class_loss_hand_computed() -> None:
    # image 0: slot 0 matched to class 0 (w = 0.75 * 0.6), slot 1 unmatched -> void 2 (w = 0.25 * 0.1)
    # image 1: slot 0 weight 0 (not counted), slot 1 -> class 1 with weight 0.5
    logits = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], [[3.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])
    targets = torch.tensor([[0, 2], [0, 1]])
    weights = torch.tensor([[0.75 * 0.6, 0.25 * 0.1], [0.0, 0.5]])
    ce00 = -math.log(math.e / (math.e + 2))
    ce01 = -math.log(math.e**2 / (math.e**2 + 2))
    ce11 = -math.log(math.e / (2 * math.e + 1))
    image0 = (0.45 * ce00 + 0.025 * ce01) / 2
    image1 = 0.5 * ce11 / 1
    assert pq_class_loss(logits, targets, weights).item() == pytest.approx((image0 + image1) / 2, rel=1e-6)


def test_pq_dice_loss_hand_computed() -> None:
    # 2 slots, 2x2 pixels (flattened to 4), pixel 3 void.
    mask_logits = torch.tensor([[[2.0, 0.0, -1.0, 5.0], [0.0, 0.0, 1.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])
    weights = torch.tensor([[0.9, 0.0]])  # slot 1 unmatched: no dice penalty
    probs = _softmax(mask_logits.numpy()[0], axis=0) * np.array([1, 1, 1, 0])
    inter = 2 * (probs[0] * target.numpy()[0, 0]).sum() + 1
    denom = probs[0].sum() + 2 + 1
    expected = 0.75 / 2 * 0.9 * (1 - inter / denom)
    got = pq_dice_loss(mask_logits, target, valid, weights, alpha=0.75, smooth=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # perfect prediction with weight 1 -> loss -> 0; slot order must matter
    sharp = torch.tensor([[[50.0, 50.0, -50.0, 0.0], [-50.0, -50.0, 50.0, 0.0]]])
    perfect = pq_dice_loss(sharp, target, valid, torch.ones(1, 2), 0.75, 1.0)
    swapped = pq_dice_loss(sharp.flip(1), target, valid, torch.ones(1, 2), 0.75, 1.0)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    assert swapped.item() > 0.5


def test_mask_id_loss_hand_computed() -> None:
    mask_logits = torch.tensor([[[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]]])
    # pixel 0 -> slot 0, pixel 1 -> slot 1, pixel 2 -> slot 1, pixel 3 void (no target, excluded)
    target = torch.zeros(1, 3, 4)
    target[0, 0, 0] = 1
    target[0, 1, 1] = 1
    target[0, 1, 2] = 1
    valid = torch.tensor([[True, True, True, False]])
    logp = np.log(_softmax(mask_logits.numpy()[0], axis=0))
    expected = -(logp[0, 0] + logp[1, 1] + logp[1, 2]) / 3
    assert mask_id_loss(mask_logits, target, valid).item() == pytest.approx(expected, rel=1e-6)
    # a valid pixel whose GT mask is unmatched (all-zero target) is not counted either
    target[0, 1, 2] = 0
    expected2 = -(logp[0, 0] + logp[1, 1]) / 2
    assert mask_id_loss(mask_logits, target, valid).item() == pytest.approx(expected2, rel=1e-6)


def _insdis_numpy(feats: np.ndarray, owner: np.ndarray, tau: float) -> float:
    """Loss over ALL pixels (sample_k >= P): owner[p] = mask index or -1 (void)."""
    total, count = 0.0, 0
    sims = feats.T @ feats / tau  # P x P
    for a in range(len(owner)):
        if owner[a] < 0:
            continue
        same = owner == owner[a]
        target = same / same.sum()
        logp = sims[a] - np.log(np.exp(sims[a]).sum())
        total += -(target * logp).sum()
        count += 1
    return total / count


def test_instance_discrimination_hand_computed_all_pixels() -> None:
    # 4 pixels: 0,1 in mask 0; 2 in mask 1; 3 void. 2-D unit features.
    angles = torch.tensor([0.0, 0.3, 2.0, 1.0])
    feats = torch.stack([angles.cos(), angles.sin()])[None]  # 1 x 2 x 4
    owner = np.array([0, 0, 1, -1])
    gt = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])
    area = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    expected = _insdis_numpy(feats[0].numpy().astype(np.float64), owner, 0.3)
    for seed in (0, 1):  # all pixels are taken whatever the noise
        got = instance_discrimination_loss(
            feats, gt, valid, area, 4096, 1.5, 0.3, torch.Generator().manual_seed(seed)
        )
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_instance_discrimination_sampling_is_seeded_and_skips_void() -> None:
    g = torch.Generator().manual_seed(0)
    p = 64
    feats = torch.nn.functional.normalize(torch.randn(2, 8, p, generator=g), dim=1)
    owner = torch.randint(0, 3, (2, p), generator=g)
    gt = torch.stack([(owner == j).float() for j in range(3)], dim=1)
    valid = owner != 2  # mask 2 is void here
    gt[:, 2] = 0
    area = (gt.sum(-1, keepdim=True) * gt).sum(1)
    run = [
        instance_discrimination_loss(feats, gt, valid, area, 16, 1.5, 0.3, torch.Generator().manual_seed(s))
        for s in (5, 5, 6)
    ]
    assert run[0].item() == run[1].item()
    assert run[0].item() != run[2].item()
    logits = small_object_sampling_logits(area, valid, 1.5)
    idx = gumbel_topk(logits, int(valid.sum(-1).min()), torch.Generator().manual_seed(1))
    assert bool(torch.gather(valid, 1, idx).all())
    assert logits[~valid].max().item() < SOFTMAX_MASKING_CONSTANT / 2


def test_sampling_prefers_small_masks() -> None:
    # mask A: 4 pixels, mask B: 60 pixels. T = 1.5 -> per-pixel odds A:B = (60/4)^1.5 ~ 58
    area = torch.tensor([[4.0] * 4 + [60.0] * 60])
    valid = torch.ones(1, 64, dtype=torch.bool)
    logits = small_object_sampling_logits(area, valid, 1.5)
    assert (logits[0, 0] - logits[0, 10]).item() == pytest.approx(1.5 * math.log(15.0), rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    hits = sum(int((gumbel_topk(logits, 4, gen) < 4).sum()) for _ in range(200))
    assert hits / 800 > 0.6  # uniform sampling would give 4/64


def test_semantic_loss_all_pixels_and_sampled() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]])  # C=3, P=4
    semantic = torch.tensor([[0, 1, 2, -1]])
    # pixel 2 is crowd: labelled (class 2) but not valid for sampling
    valid = torch.tensor([[True, True, False, False]])
    area = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    logp = np.log(_softmax(logits.numpy()[0], axis=0))
    all_pixels = -(logp[0, 0] + logp[1, 1] + logp[2, 2]) / 3
    sampled = -(logp[0, 0] + logp[1, 1]) / 2
    assert semantic_loss(logits, semantic, valid, area, 0, 2.0, -1).item() == pytest.approx(
        all_pixels, rel=1e-6
    )
    got = semantic_loss(logits, semantic, valid, area, 4096, 2.0, -1, torch.Generator().manual_seed(0))
    assert got.item() == pytest.approx(sampled, rel=1e-6)


def test_losses_are_finite_without_any_labelled_pixel() -> None:
    logits = torch.randn(1, 3, 4, requires_grad=True)
    target = torch.zeros(1, 3, 4)
    valid = torch.zeros(1, 4, dtype=torch.bool)
    feats = torch.nn.functional.normalize(torch.randn(1, 2, 4), dim=1).requires_grad_()
    values = [
        mask_id_loss(logits, target, valid),
        pq_dice_loss(logits, target, valid, torch.zeros(1, 3), 0.75),
        instance_discrimination_loss(feats, target, valid, torch.zeros(1, 4), 8, 1.5, 0.3),
        semantic_loss(logits, torch.full((1, 4), -1), valid, torch.zeros(1, 4), 8, 2.0, -1),
    ]
    for value in values:
        assert torch.isfinite(value).item()
        assert value.item() == 0.0
    sum(values).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(feats.grad).all()
