"""Hungarian matcher: brute-force optimality, the similarity formulas, and empty ground truth."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kmax_model.matcher import MATCH_DICE_EPS, class_similarity, hungarian_match, mask_similarity


def _numpy_cost(class_logits, mask_logits, gt_masks, labels, valid):
    """Independent numpy version of -dice * class_prob (float64)."""
    cl = class_logits.numpy().astype(np.float64)
    cp = np.exp(cl - cl.max(-1, keepdims=True))
    cp /= cp.sum(-1, keepdims=True)
    ml = mask_logits.numpy().astype(np.float64).reshape(mask_logits.shape[0], -1)
    mp = np.exp(ml - ml.max(0, keepdims=True))
    mp /= mp.sum(0, keepdims=True)
    mp *= valid.numpy().reshape(1, -1)
    gt = gt_masks.numpy().astype(np.float64).reshape(gt_masks.shape[0], -1)
    n, m = mp.shape[0], gt.shape[0]
    dice = np.zeros((n, m))
    for i in range(n):
        for j in range(m):
            dice[i, j] = (mp[i] * gt[j]).sum() / ((mp[i].sum() + gt[j].sum()) / 2 + MATCH_DICE_EPS)
    prob = cp[:, labels.numpy()]
    return -dice * prob, dice, prob


def _random_case(seed: int, n: int, m: int, k: int = 4, h: int = 4, w: int = 5):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(n, k + 1, generator=g) * 2
    mask_logits = torch.randn(n, h, w, generator=g) * 3
    owner = torch.randint(0, m + 1, (h, w), generator=g)  # m = void
    gt_masks = torch.stack([(owner == j).float() for j in range(m)]) if m else torch.zeros(0, h, w)
    labels = torch.randint(0, k, (m,), generator=g)
    valid = owner < m
    return class_logits, mask_logits, gt_masks, labels, valid


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(("n", "m"), [(5, 3), (4, 4), (6, 1), (3, 3)])
def test_matcher_equals_brute_force(seed: int, n: int, m: int) -> None:
    case = _random_case(seed * 31 + n * 7 + m, n, m)
    result = hungarian_match(*case)
    cost, dice, prob = _numpy_cost(*case)
    best = min(
        sum(cost[slot, j] for j, slot in enumerate(slots)) for slots in itertools.permutations(range(n), m)
    )
    got = cost[result.slot_indices.numpy(), result.gt_indices.numpy()].sum()
    assert got == pytest.approx(best, abs=1e-9)
    assert len(result.slot_indices) == m
    assert sorted(result.gt_indices.tolist()) == list(range(m))
    assert len(set(result.slot_indices.tolist())) == m
    # reported matched quantities are the pair's dice and class probability
    np.testing.assert_allclose(
        result.matched_dice.numpy(), dice[result.slot_indices, result.gt_indices], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        result.matched_class_prob.numpy(), prob[result.slot_indices, result.gt_indices], rtol=1e-5, atol=1e-7
    )


def test_matcher_with_no_ground_truth() -> None:
    class_logits, mask_logits, gt_masks, labels, valid = _random_case(7, 4, 0)
    result = hungarian_match(class_logits, mask_logits, gt_masks, labels, valid)
    for t in (result.slot_indices, result.gt_indices, result.matched_dice, result.matched_class_prob):
        assert t.numel() == 0


def test_similarity_hand_computed() -> None:
    # 2 slots, 2 pixels; logits make softmax over slots exactly [0.5, 0.5] on pixel 0 and ~[1, 0] on pixel 1.
    mask_logits = torch.tensor([[0.0, 50.0], [0.0, -50.0]])
    gt = torch.tensor([[1.0, 1.0]])
    valid = torch.tensor([True, True])
    sim = mask_similarity(mask_logits, gt, valid)
    # slot 0: inter = 0.5 + 1 = 1.5, sum m = 1.5, sum y = 2 -> 1.5 / (1.75 + eps)
    assert sim[0, 0].item() == pytest.approx(1.5 / (1.75 + MATCH_DICE_EPS), rel=1e-6)
    assert sim[1, 0].item() == pytest.approx(0.5 / (1.25 + MATCH_DICE_EPS), rel=1e-6)
    # void pixel 1 removed from the prediction: slot 0 -> inter 0.5, sum m 0.5, sum y (pixel 0 only) 1
    sim_void = mask_similarity(mask_logits, torch.tensor([[1.0, 0.0]]), torch.tensor([True, False]))
    assert sim_void[0, 0].item() == pytest.approx(0.5 / (0.75 + MATCH_DICE_EPS), rel=1e-6)
    # class similarity: softmax over all K+1 (void included), void column never selected
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    assert class_similarity(logits, torch.tensor([1, 0]))[0].tolist() == pytest.approx([0.3, 0.2], rel=1e-6)


def test_matcher_prefers_right_class_and_mask() -> None:
    # slot 1 predicts GT 0's mask and class, slot 0 GT 1's: the matching must cross over.
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    mask_logits = torch.stack([gt[1] * 10, gt[0] * 10, torch.zeros(2, 2)])
    class_logits = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    result = hungarian_match(
        class_logits, mask_logits, gt, torch.tensor([0, 1]), torch.ones(2, 2, dtype=torch.bool)
    )
    pairs = dict(zip(result.gt_indices.tolist(), result.slot_indices.tolist()))
    assert pairs == {0: 1, 1: 0}
