"""Pure loss functions of the kMaX-DeepLab objective (reference_kmax.md §4).

Every function takes batch tensors whose GT side is already permuted to the prediction slots by the
criterion (matched slot ``i`` holds the GT mask / class matched to it, unmatched slots hold zeros / void)
and returns a scalar: a per-image normalised sum, averaged over the batch. Callers run them in fp32.

Ports (maths only) of deeplab2 ``model/loss/max_deeplab_loss.py`` and ``base_loss.py`` @ 64bc1c1a and
bytedance/kmax-deeplab ``kmax_deeplab/modeling/criterion.py`` @ f8e1d046.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kmax_model.config_objective import MASK_APPROX_TERMS

SOFTMAX_MASKING_CONSTANT = -99999.0
"""Logit added to pixels that must not be sampled (void), as in deeplab2 / bytedance."""

_UNIFORM_FLOOR = 1e-20
"""Lower clamp of uniform noise before the double log of the Gumbel trick (avoids log(0))."""


def _per_image_mean(loss: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Sum ``loss`` [B, X] over X divided by the number of counted entries (at least 1), mean over B."""
    count = counted.to(loss.dtype).sum(-1).clamp(min=1.0)
    return (loss.sum(-1) / count).mean()


def pq_class_loss(
    class_logits: torch.Tensor, target_classes: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """PQ-style classification term: weighted softmax cross-entropy per slot.

    ``L = mean_b [ sum_i w_i CE(logits_i, c_i) / #{i : w_i > 0} ]``. The criterion sets
    ``w_i = alpha * max(dice_i, eps)`` for matched slots (target = GT class) and
    ``w_i = (1 - alpha) * max(void_ratio_i, eps)`` for unmatched slots (target = void = K).
    (deeplab2 ``FocalCrossEntropyLoss`` with gamma 0; the reference normalises by the number of non-zero
    weighted losses, which equals the number of positive weights unless a CE is exactly 0.)

    Args:
        class_logits: [B, N, K+1] logits, last channel void.
        target_classes: [B, N] int64 targets in 0..K.
        weights: [B, N] non-negative stop-gradient weights.
    """
    ce = F.cross_entropy(class_logits.transpose(1, 2), target_classes, reduction="none")  # B x N
    return _per_image_mean(ce * weights, weights > 0)


def pq_dice_loss(
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    smooth: float = 1.0,
) -> torch.Tensor:
    """PQ-style mask term: weighted dice loss of slot-softmax masks.

    ``L = mean_b [ alpha / N * sum_i w_i (1 - (2 sum_p m_i v y_i + s) / (sum_p m_i v + sum_p y_i + s)) ]``
    with ``m = softmax over slots``, void pixels zeroed, ``w_i = max(p_i(c_i), eps)`` for matched slots and 0
    for unmatched ones (deeplab2 ``_mask_dice_term_modifier``).

    Args:
        mask_logits: [B, N, P] mask logits.
        target_masks: [B, N, P] GT masks permuted to the slots (zeros for unmatched slots).
        valid: [B, P] bool non-void pixels.
        weights: [B, N] stop-gradient weights.
        alpha: PQ-style alpha (0.75).
        smooth: additive smoothing (1.0).
    """
    probs = mask_logits.softmax(dim=1) * valid[:, None, :].to(mask_logits.dtype)  # B x N x P
    loss = _dice_loss(probs, target_masks, smooth) * weights  # B x N
    return (loss.sum(-1) * alpha / mask_logits.shape[1]).mean()


def _dice_loss(probs: torch.Tensor, targets: torch.Tensor, smooth: float) -> torch.Tensor:
    """Per slot ``1 - (2 sum_p m y + s) / (sum_p m + sum_p y + s)`` ``[B, N]`` of ``probs`` and ``targets``
    ``[B, N, P]`` (void pixels already zeroed where the caller wants them out)."""
    intersection = 2.0 * (probs * targets).sum(-1) + smooth
    return 1.0 - intersection / (probs.sum(-1) + targets.sum(-1) + smooth)


def mask_id_loss(mask_logits: torch.Tensor, target_masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mask-ID cross-entropy: each labelled pixel classifies which slot it belongs to.

    ``L = mean_b [ sum_p v_p CE(softmax_N(logits[:, p]), y[:, p]) / #{p : v_p and sum_i y_ip > 0} ]`` where
    ``y[:, p]`` is the (overlap-normalised) slot target of pixel p. Pixels of GT masks left unmatched
    (M > N) have an all-zero target and neither add loss nor count.

    Args:
        mask_logits: [B, N, P] mask logits.
        target_masks: [B, N, P] GT masks permuted to the slots, summing to <= 1 over N at each pixel.
        valid: [B, P] bool non-void pixels.
    """
    ce = F.cross_entropy(mask_logits, target_masks, reduction="none")  # B x P
    counted = valid & (target_masks.sum(1) > 0)
    return _per_image_mean(ce * counted.to(ce.dtype), counted)


def gumbel_topk(logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``k`` indices per row without replacement from ``softmax(logits)`` (Gumbel-top-k trick).

    Args:
        logits: [B, P] sampling logits.
        k: number of samples, ``1 <= k <= P``.
        generator: optional generator for reproducible noise (on the logits' device).

    Returns:
        [B, k] int64 indices.
    """
    uniform = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=_UNIFORM_FLOOR)))
    return torch.topk(logits + gumbel, k, dim=-1).indices


def small_object_sampling_logits(area: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sampling logits ``T * log(P / max(area, 1))`` (biased to small masks when T > 1), void masked out.

    Args:
        area: [B, P] pixel count of the GT mask containing each pixel (0 outside every mask).
        valid: [B, P] bool pixels allowed to be sampled.
        temperature: sampling temperature T.
    """
    num_pixels = area.shape[-1]
    logits = torch.log(num_pixels / area.clamp(min=1.0)) * temperature
    return logits + (~valid).to(logits.dtype) * SOFTMAX_MASKING_CONSTANT


def instance_discrimination_loss(
    pixel_feature: torch.Tensor,
    gt_masks: torch.Tensor,
    valid: torch.Tensor,
    area: torch.Tensor,
    sample_k: int,
    sample_temperature: float,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pixel-wise instance discrimination (CMT-DeepLab's sampled pixel-contrastive loss).

    Samples ``k = min(sample_k, P)`` pixels per image by Gumbel-top-k on `small_object_sampling_logits`,
    then for sampled pixels a, b: target ``G_ab = [a, b in the same GT mask] / #{b' in a's mask}`` and
    prediction ``softmax_b(f_a . f_b / temperature)``; the loss is the mean over sampled pixels that lie
    in a GT mask of the cross-entropy, averaged over the batch (deeplab2
    ``_call_pixel_contrastive_instance_discrimination_loss`` @ 64bc1c1a).

    Args:
        pixel_feature: [B, D, P] L2-normalised pixel embeddings.
        gt_masks: [B, M, P] GT masks (any padding with empty masks; overlap-normalised).
        valid: [B, P] bool non-void pixels.
        area: [B, P] area of the GT mask containing each pixel.
        sample_k: number of sampled pixels.
        sample_temperature: sampling temperature T_s.
        temperature: similarity temperature tau.
        generator: optional generator for the Gumbel noise.
    """
    k = min(sample_k, pixel_feature.shape[-1])
    indices = gumbel_topk(
        small_object_sampling_logits(area, valid, sample_temperature), k, generator
    )  # B x k
    gt = torch.gather(gt_masks, 2, indices[:, None, :].expand(-1, gt_masks.shape[1], -1))  # B x M x k
    gt_similarity = torch.einsum("bma,bmc->bac", gt, gt)  # B x k x k
    row_mass = gt_similarity.sum(-1, keepdim=True)  # B x k x 1
    gt_similarity = gt_similarity / row_mass.clamp(min=1.0)
    feats = torch.gather(
        pixel_feature, 2, indices[:, None, :].expand(-1, pixel_feature.shape[1], -1)
    )  # B x D x k
    logits = torch.einsum("bda,bdc->bac", feats, feats) / temperature  # B x k x k
    ce = -(gt_similarity * logits.log_softmax(dim=-1)).sum(-1)  # B x k
    counted = row_mass[..., 0] > 0
    return _per_image_mean(ce * counted.to(ce.dtype), counted)


def semantic_loss(
    semantic_logits: torch.Tensor,
    semantic: torch.Tensor,
    valid: torch.Tensor,
    area: torch.Tensor,
    sample_k: int,
    sample_temperature: float,
    ignore_index: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Auxiliary semantic cross-entropy, on ``sample_k`` Gumbel-top-k sampled pixels or on all (k = 0).

    With sampling, only ``valid`` pixels are sampled (void and crowd excluded, as in bytedance where the
    sampling mask is "in no GT mask"); without it every pixel whose label is not ``ignore_index`` counts.
    The loss is the mean CE over counted pixels per image, averaged over the batch.

    Args:
        semantic_logits: [B, C, P] logits (C >= K; a void channel may be present).
        semantic: [B, P] int64 class ids, ``ignore_index`` on void.
        valid: [B, P] bool non-void, non-crowd pixels.
        area: [B, P] area of the GT mask containing each pixel.
        sample_k: number of sampled pixels per image; 0 = all pixels.
        sample_temperature: sampling temperature.
        ignore_index: label of ignored pixels.
        generator: optional generator for the Gumbel noise.
    """
    if sample_k > 0:
        k = min(sample_k, semantic.shape[-1])
        indices = gumbel_topk(small_object_sampling_logits(area, valid, sample_temperature), k, generator)
        semantic_logits = torch.gather(
            semantic_logits, 2, indices[:, None, :].expand(-1, semantic_logits.shape[1], -1)
        )  # B x C x k
        semantic = torch.gather(semantic, 1, indices)  # B x k
        valid = torch.gather(valid, 1, indices)
        counted = valid & (semantic != ignore_index)
    else:
        counted = semantic != ignore_index
    safe_target = torch.where(counted, semantic, torch.zeros_like(semantic))
    ce = F.cross_entropy(semantic_logits, safe_target, reduction="none")  # B x k
    return _per_image_mean(ce * counted.to(ce.dtype), counted)


def mask_approximation_loss(
    reference_logits: torch.Tensor,
    target_masks: torch.Tensor,
    valid: torch.Tensor,
    matched: torch.Tensor,
    terms: str = "dice_bce",
    smooth: float = 1.0,
) -> torch.Tensor:
    """CMT-DeepLab's mask-approximation loss as reconstructed (kmax_model.cmt): each matched slot's
    reference mask against its GT mask, per slot a sigmoid mask (not a softmax over slots).

    With ``s = sigmoid(R)``, ``v`` the non-void pixels and ``y`` the slot's GT mask::

        dice_n = 1 - (2 sum_p v s y + smooth) / (sum_p v s + sum_p v y + smooth)
        bce_n  = sum_p v BCE(R, y) / max(sum_p v, 1)
        L = mean_b [ sum_{n matched} (dice_n [+ bce_n]) / max(#matched, 1) ]

    Args:
        reference_logits: [B, N, P] reference-mask logits.
        target_masks: [B, N, P] GT masks permuted to the slots (zeros for unmatched slots).
        valid: [B, P] bool non-void pixels.
        matched: [B, N] bool slots matched to a GT mask (only these count).
        terms: "dice", "bce" or "dice_bce" (their sum).
        smooth: additive smoothing of the dice (the PQ dice's ``loss.dice_smooth``).
    """
    if terms not in MASK_APPROX_TERMS:
        raise ValueError(f"loss.mask_approx_terms must be one of {MASK_APPROX_TERMS}, got {terms!r}")
    v = valid[:, None, :].to(reference_logits.dtype)  # B x 1 x P
    loss = reference_logits.new_zeros(reference_logits.shape[:2])  # B x N
    if terms in ("dice", "dice_bce"):
        loss = loss + _dice_loss(reference_logits.sigmoid() * v, target_masks * v, smooth)
    if terms in ("bce", "dice_bce"):
        bce = F.binary_cross_entropy_with_logits(reference_logits, target_masks, reduction="none")
        loss = loss + (bce * v).sum(-1) / v.sum(-1).clamp(min=1.0)
    return _per_image_mean(loss * matched.to(loss.dtype), matched)
