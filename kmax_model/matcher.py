"""Hungarian matching of predicted mask slots to ground-truth masks with the PQ-style similarity.

Port of the matching in deeplab2 ``model/loss/max_deeplab_loss.py`` (``_compute_mask_similarity`` and the
PQ-style similarity, L158 / L941) @ 64bc1c1a and bytedance/kmax-deeplab ``kmax_deeplab/modeling/matcher.py``
@ f8e1d046 (per image, scipy ``linear_sum_assignment``). Everything runs without gradient and in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

MATCH_DICE_EPS = 1e-5
"""Additive constant of the matching dice denominator (deeplab2 ``denominator_epsilon``)."""


@dataclass
class MatchResult:
    """The one-to-one assignment of one image (``m = min(N, M)`` pairs).

    Attributes:
        slot_indices: int64 [m], matched prediction slots.
        gt_indices: int64 [m], the ground-truth mask matched to each slot in ``slot_indices``.
        matched_dice: float32 [m], matching dice similarity of each pair (no gradient).
        matched_class_prob: float32 [m], predicted probability of the GT class for each pair (no gradient).
    """

    slot_indices: torch.Tensor
    gt_indices: torch.Tensor
    matched_dice: torch.Tensor
    matched_class_prob: torch.Tensor


def mask_similarity(mask_logits: torch.Tensor, gt_masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Dice similarity between every predicted slot and every GT mask.

    ``dice_ij = sum_p m_i v y_j / ((sum_p m_i v + sum_p y_j) / 2 + eps)`` with ``m = softmax over slots``
    and void pixels (``v = 0``) removed from the prediction.

    Args:
        mask_logits: [N, P] mask logits of one image (P pixels).
        gt_masks: [M, P] binary (or overlap-normalised) GT masks.
        valid: [P] bool, False on void and crowd pixels.

    Returns:
        [N, M] float32 similarities in [0, 1].
    """
    probs = mask_logits.float().softmax(dim=0) * valid.float()[None, :]  # N x P
    gt = gt_masks.float()
    intersection = probs @ gt.T  # N x M
    denominator = (probs.sum(-1)[:, None] + gt.sum(-1)[None, :]) / 2.0
    return intersection / (denominator + MATCH_DICE_EPS)


def class_similarity(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Probability of each GT mask's class under each slot's class distribution.

    Args:
        class_logits: [N, K+1] logits, last channel void (excluded from the result, not from the softmax).
        labels: [M] int64 contiguous class ids in 0..K-1.

    Returns:
        [N, M] float32 probabilities.
    """
    probs = class_logits.float().softmax(dim=-1)[:, :-1]  # N x K
    return probs[:, labels]


@torch.no_grad()
def hungarian_match(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
) -> MatchResult:
    """Match slots to GT masks of one image by minimising ``-dice_ij * p_i(c_j)``.

    Args:
        class_logits: [N, K+1] class logits (last = void).
        mask_logits: [N, h, w] mask logits at the target grid.
        gt_masks: [M, h, w] GT masks (M may be 0).
        labels: [M] int64 class ids.
        valid: [h, w] bool non-void pixels.

    Returns:
        The `MatchResult` (``min(N, M)`` pairs, ordered by slot index).
    """
    with torch.autocast(device_type=mask_logits.device.type, enabled=False):
        num_slots = mask_logits.shape[0]
        num_gt = gt_masks.shape[0]
        device = mask_logits.device
        if num_gt == 0:
            empty_long = torch.zeros(0, dtype=torch.int64, device=device)
            empty_float = torch.zeros(0, dtype=torch.float32, device=device)
            return MatchResult(empty_long, empty_long.clone(), empty_float, empty_float.clone())
        dice = mask_similarity(
            mask_logits.reshape(num_slots, -1), gt_masks.reshape(num_gt, -1), valid.reshape(-1)
        )
        cls_prob = class_similarity(class_logits, labels)
        cost = (-dice * cls_prob).cpu().numpy().astype(np.float64)  # N x M
        rows, cols = linear_sum_assignment(cost)
        slot_indices = torch.as_tensor(rows, dtype=torch.int64, device=device)
        gt_indices = torch.as_tensor(cols, dtype=torch.int64, device=device)
        return MatchResult(
            slot_indices=slot_indices,
            gt_indices=gt_indices,
            matched_dice=dice[slot_indices, gt_indices],
            matched_class_prob=cls_prob[slot_indices, gt_indices],
        )
