"""Mask losses at input resolution: mask logits read at input pixels, GT read from the input-size label.

The reference kMaX losses (deeplab2, bytedance/kmax-deeplab) see the ground truth only at the output-stride
grid (strided subsampling), while inference upsamples the mask logits bilinearly to the input size. The
loss therefore never sees where, between grid points, a boundary lies: measured on the two COCO sample
images, the exact GT taken at the stride-4 grid points and upsampled like a prediction scores PQ 85.5
against the full-resolution GT, so a grid-supervised model cannot reach PQ 90 on them.

`LossConfig.mask_loss_at = "input"` evaluates the dice and mask-ID terms at input pixels instead: the mask
logits are read there exactly as inference reads them (bilinear, ``align_corners=True`` over the padded
input, `kmax_model.postprocess.upsample_mask_logits`), and the GT is the mask index of the input pixel
(`Target.input_index`). ``mask_loss_points > 0`` reads K pixels per image sampled uniformly without
replacement among the pixels that lie in a GT mask (every such pixel when fewer than K), in the spirit of
Mask2Former's point-sampled mask loss (facebookresearch/Mask2Former ``mask2former/modeling/criterion.py``
``loss_masks`` @ 161be514); ``0`` reads every pixel. The sample is uniform, or with
``mask_loss_hard_ratio > 0`` partly the hardest of oversampled candidates (`sample_hard_input_points`).
Matching, instance discrimination and the semantic loss stay on the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kmax_model.losses import SOFTMAX_MASKING_CONSTANT, gumbel_topk


@dataclass
class InputPoints:
    """The input pixels where one criterion call evaluates its mask losses (shared by every output).

    Attributes:
        coords: [B, K, 2] float (x, y) in ``grid_sample``'s normalised [-1, 1] coordinates with
            ``align_corners=True`` over the ``H x W`` input; None when every pixel is read.
        gt_index: [B, K] int64 index of the GT mask containing each point (into ``Target.masks``), -1 for
            pixels in no mask (void, crowd, padding, segments too small to reach the grid).
        size: (H, W) of the input.
    """

    coords: torch.Tensor | None
    gt_index: torch.Tensor
    size: tuple[int, int]

    @property
    def valid(self) -> torch.Tensor:
        """[B, K] bool: the point lies in a GT mask (the ``v(p)`` of the losses)."""
        return self.gt_index >= 0


def sample_input_points(
    input_index: torch.Tensor, num_points: int, generator: torch.Generator | None = None
) -> InputPoints:
    """Choose the input pixels of the mask losses.

    Args:
        input_index: [B, H, W] int64 GT mask index of every input pixel (-1 in no mask).
        num_points: K > 0 samples K pixels per image uniformly without replacement, preferring pixels in a
            mask (pixels in no mask are taken only when an image has fewer than K in a mask); 0 or
            K >= H*W reads every pixel.
        generator: optional generator making the sample reproducible.
    """
    batch, height, width = input_index.shape
    flat = input_index.flatten(1)
    if num_points == 0 or num_points >= height * width:
        return InputPoints(coords=None, gt_index=flat, size=(height, width))
    return _points_at(flat, _uniform_pixels(flat, num_points, generator), (height, width))


def sample_hard_input_points(
    input_index: torch.Tensor,
    mask_logits: torch.Tensor,
    gt_to_slot: torch.Tensor,
    num_points: int,
    hard_ratio: float,
    oversample: float,
    generator: torch.Generator | None = None,
) -> InputPoints:
    """Point sampling biased to the pixels the model gets wrong, after Mask2Former's importance sampling
    (``get_uncertain_point_coords_with_randomness`` in ``mask2former/modeling/criterion.py`` @ 161be514:
    oversample uniform candidates, keep the most uncertain fraction, fill the rest uniformly).

    Mask2Former ranks a candidate by the uncertainty ``-|logit|`` of one mask. Here one sample serves the
    softmax over every slot, and a pixel confidently given to the wrong slot (a small object's mask spilling
    onto the hand that holds it) is not uncertain; so a candidate is ranked by ``1 - p``, with ``p`` the
    softmax probability of the slot matched to its GT mask (hard-example mining on the mask-ID loss).

    Args:
        input_index: [B, H, W] int64 GT mask index of every input pixel (-1 in no mask).
        mask_logits: [B, N, h, w] final-output mask logits (read without gradient).
        gt_to_slot: [B, M] int64 slot matched to each GT mask of the final output, -1 when unmatched.
        num_points: K > 0 points per image.
        hard_ratio: fraction of the K points taken as the hardest candidates, in [0, 1].
        oversample: ``ceil(oversample * K)`` uniform candidates per image (capped at H*W), >= 1.
        generator: optional generator making the candidate sample reproducible.
    """
    batch, height, width = input_index.shape
    if num_points >= height * width:
        return sample_input_points(input_index, num_points, generator)
    flat = input_index.flatten(1)
    num_candidates = min(math.ceil(oversample * num_points), height * width)
    candidates = _uniform_pixels(flat, num_candidates, generator)  # B x C, in random order
    with torch.no_grad():
        at = _points_at(flat, candidates, (height, width))
        probs = mask_logits_at(mask_logits.detach().float(), at).softmax(dim=1)  # B x N x C
        slot = torch.gather(gt_to_slot, 1, at.gt_index.clamp(min=0))
        known = at.valid & (slot >= 0)
        p_matched = torch.gather(probs, 1, slot.clamp(min=0)[:, None]).squeeze(1)
        hardness = torch.where(known, 1.0 - p_matched, torch.full_like(p_matched, -1.0))
    num_hard = round(hard_ratio * num_points)
    hard = hardness.topk(num_hard, dim=1).indices  # B x num_hard
    # The uniform rest: the first candidates (a uniform order) that were not taken as hard.
    rank = torch.arange(num_candidates, device=flat.device).expand(batch, -1).clone()
    rank.scatter_(1, hard, num_candidates)
    rest = rank.topk(num_points - num_hard, dim=1, largest=False).indices
    chosen = torch.gather(candidates, 1, torch.cat([hard, rest], dim=1))
    return _points_at(flat, chosen, (height, width))


def _uniform_pixels(flat: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """[B, count] flat pixel indices drawn uniformly without replacement, in-mask pixels first."""
    in_mask = flat >= 0
    # Gumbel-top-k over equal logits is a uniform sample without replacement; masked pixels sort last.
    logits = torch.zeros(flat.shape, device=flat.device) + (~in_mask).float() * SOFTMAX_MASKING_CONSTANT
    return gumbel_topk(logits, count, generator)


def _points_at(flat: torch.Tensor, indices: torch.Tensor, size: tuple[int, int]) -> InputPoints:
    """`InputPoints` of the flat pixel ``indices`` [B, K] of an ``H x W`` input whose GT index is ``flat``."""
    height, width = size
    ys = torch.div(indices, width, rounding_mode="floor").float()
    xs = (indices % width).float()
    coords = torch.stack(
        [xs * 2.0 / max(width - 1, 1) - 1.0, ys * 2.0 / max(height - 1, 1) - 1.0], dim=-1
    )  # B x K x 2, (x, y) as grid_sample wants
    return InputPoints(coords=coords, gt_index=torch.gather(flat, 1, indices), size=size)


def mask_logits_at(mask_logits: torch.Tensor, points: InputPoints) -> torch.Tensor:
    """[B, N, h, w] grid mask logits -> [B, N, K] logits at the points (bilinear, align_corners=True)."""
    if points.coords is None:
        return F.interpolate(mask_logits, size=points.size, mode="bilinear", align_corners=True).flatten(2)
    sampled = F.grid_sample(mask_logits, points.coords[:, None], mode="bilinear", align_corners=True)
    return sampled[:, :, 0]  # B x N x 1 x K -> B x N x K


def slot_targets_at(points: InputPoints, gt_to_slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, N, K] one-hot slot target of every point: the slot matched to the point's GT mask.

    Args:
        points: the sampled points.
        gt_to_slot: [B, M] int64 slot matched to each GT mask, -1 when unmatched (M > N) or padding.
        num_slots: N.

    Points in no mask, or in an unmatched mask, get an all-zero target (as unmatched masks' pixels do on
    the grid: they add no mask-ID loss, and only their predicted mass enters the dice denominators).
    """
    safe = points.gt_index.clamp(min=0)
    slot = torch.gather(gt_to_slot, 1, safe)  # B x K
    slot = torch.where(points.valid, slot, torch.full_like(slot, -1))
    target = F.one_hot(slot.clamp(min=0), num_slots).float() * (slot >= 0)[..., None].float()  # B x K x N
    return target.transpose(1, 2)
