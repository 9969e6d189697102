"""The kMaX training criterion: matching + loss terms -> dict of UNWEIGHTED scalar losses.

Orchestration follows bytedance/kmax-deeplab ``kmax_deeplab/modeling/criterion.py``
(``SetCriterion.process_gt``, ``forward``) @ f8e1d046 and deeplab2 ``model/loss/max_deeplab_loss.py``
L931-1040 @ 64bc1c1a: the Hungarian matching and the stop-gradient PQ-style weights are computed once on
the final output and shared by every auxiliary decoder-layer output (unless
``LossConfig.share_final_matching`` is False); the semantic loss applies to the final output only.
With ``LossConfig.mask_loss_at = "input"`` the dice and mask-ID terms read the mask logits at input pixels
(`kmax_model.mask_points`; one point sample per call, shared by every output).
Everything is computed in fp32 with autocast disabled.

Usage in a train step::

    criterion = build_criterion(cfg)
    losses = criterion(model(images), targets)
    total = criterion.total(losses)          # sum_k weight_of(k) * losses[k]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kmax_model.config_objective import LossConfig
from kmax_model.losses import (
    instance_discrimination_loss,
    mask_approximation_loss,
    mask_id_loss,
    pq_class_loss,
    pq_dice_loss,
    semantic_loss,
)
from kmax_model.mask_points import (
    InputPoints,
    mask_logits_at,
    sample_hard_input_points,
    sample_input_points,
    slot_targets_at,
)
from kmax_model.matcher import MatchResult, hungarian_match
from kmax_model.targets import IGNORE_INDEX, Target

if TYPE_CHECKING:
    from kmax_model.config import KMaXConfig

VOID_RATIO_EPS = 1e-5
"""Denominator constant of an unmatched slot's void ratio (bytedance ``computer_iou_score``)."""

LOSS_KEY_TO_WEIGHT_FIELD = {
    "loss_pq_class": "pq_class_weight",
    "loss_pq_dice": "pq_dice_weight",
    "loss_mask_id": "mask_id_weight",
    "loss_insdis": "insdis_weight",
    "loss_semantic": "semantic_weight",
    "loss_mask_approx": "mask_approx_weight",
}
"""Base loss key -> the `LossConfig` field holding its weight. Aux copies are ``<key>_aux<i>``."""

AUX_KEYS = ("class_logits", "mask_logits", "pixel_feature", "reference_logits")
"""The keys of an auxiliary output the losses read (``reference_logits``: ``cmt`` mode only)."""

_AUX_SUFFIX = re.compile(r"^(?P<base>.+)_aux(?P<index>\d+)$")


@dataclass
class SlotTargets:
    """GT of a batch permuted to the prediction slots, plus the stop-gradient PQ-style weights.

    Attributes:
        masks: [B, N, P] GT mask of the GT matched to each slot (zeros for unmatched slots), normalised so
            that overlapping masks sum to 1 at every pixel.
        classes: [B, N] int64 GT class of each slot, K (void) for unmatched slots.
        class_weights: [B, N] ``alpha * max(dice, eps)`` (matched) / ``(1 - alpha) * max(void_ratio, eps)``.
        dice_weights: [B, N] ``max(p(c), eps)`` (matched) / 0 (unmatched).
        valid: [B, P] bool non-void pixels.
        gt_masks: [B, Mmax, P] the unpermuted GT masks (zero-padded), for instance discrimination.
        area: [B, P] float GT mask area of each pixel.
        semantic: [B, h, w] int64 semantic labels (IGNORE_INDEX on void).
        valid_map: [B, h, w] bool, the 2-D ``valid`` (for strided subsampling of the semantic GT).
        area_map: [B, h, w] float, the 2-D ``area``.
        gt_to_slot: [B, Mmax] int64 slot matched to each GT mask, -1 for unmatched masks and padding.
    """

    masks: torch.Tensor
    classes: torch.Tensor
    class_weights: torch.Tensor
    dice_weights: torch.Tensor
    valid: torch.Tensor
    gt_masks: torch.Tensor
    area: torch.Tensor
    semantic: torch.Tensor
    valid_map: torch.Tensor
    area_map: torch.Tensor
    gt_to_slot: torch.Tensor


def _check_input_index(targets: list[Target], grid: tuple[int, int]) -> None:
    sizes = set()
    for index, target in enumerate(targets):
        if "input_index" not in target:
            raise ValueError(
                f"targets[{index}] lacks 'input_index', which loss.mask_loss_at='input' needs "
                "(pipeline.data.augment builds it when the collate is made with input_targets=True)"
            )
        shape = tuple(target["input_index"].shape)
        if len(shape) != 2 or shape[0] < grid[0] or shape[1] < grid[1]:
            raise ValueError(f"targets[{index}]['input_index'] is {shape}: expected (H, W) >= grid {grid}")
        sizes.add(shape)
    if len(sizes) > 1:
        raise ValueError(f"targets' input_index sizes differ within the batch: {sorted(sizes)}")


def _check_targets(outputs: dict[str, Any], targets: list[Target], input_index: bool) -> None:
    batch, _, height, width = outputs["mask_logits"].shape
    if len(targets) != batch:
        raise ValueError(f"criterion got {len(targets)} targets for a batch of {batch} predictions")
    for index, target in enumerate(targets):
        for key in ("masks", "labels", "valid", "semantic", "area"):
            if key not in target:
                raise ValueError(f"targets[{index}] lacks the key {key!r} (see kmax_model.targets.Target)")
        if tuple(target["valid"].shape) != (height, width) or tuple(target["masks"].shape[1:]) != (
            height,
            width,
        ):
            raise ValueError(
                f"targets[{index}] is at {tuple(target['valid'].shape)} "
                f"(masks {tuple(target['masks'].shape)}) "
                f"but mask_logits are at {(height, width)}: targets must be built at the output-stride grid"
            )
        if target["masks"].shape[0] != target["labels"].shape[0]:
            raise ValueError(
                f"targets[{index}] has {target['masks'].shape[0]} masks "
                f"but {target['labels'].shape[0]} labels"
            )
    if input_index:
        _check_input_index(targets, (height, width))


class Criterion:
    """Callable ``(outputs, targets, generator=None) -> dict[str, Tensor]`` of unweighted scalar losses.

    Keys: ``loss_pq_class``, ``loss_pq_dice``, ``loss_mask_id``, ``loss_insdis`` for the final output and
    ``<key>_aux<i>`` for ``outputs["aux_outputs"][i]``; ``loss_semantic`` when ``outputs`` has
    ``semantic_logits``; ``loss_mask_approx_aux<i>`` for an auxiliary output with ``reference_logits``
    (``cmt`` mode: each layer's reference masks against the GT of the same matching, on the output-stride
    grid even with ``mask_loss_at = "input"``). Terms whose weight is 0 are not computed.

    Args:
        loss_cfg: the loss configuration (weights and hyper-parameters).
        num_classes: K, the number of real classes (void = channel K of the class logits).
    """

    def __init__(self, loss_cfg: LossConfig, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.cfg = loss_cfg
        self.num_classes = num_classes

    def weight_of(self, key: str) -> float:
        """The `LossConfig` weight of a loss key (aux copies share their base key's weight)."""
        match = _AUX_SUFFIX.match(key)
        base = match.group("base") if match else key
        if base not in LOSS_KEY_TO_WEIGHT_FIELD:
            raise KeyError(f"unknown loss key {key!r}; known: {sorted(LOSS_KEY_TO_WEIGHT_FIELD)} (+ _aux<i>)")
        return float(getattr(self.cfg, LOSS_KEY_TO_WEIGHT_FIELD[base]))

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """``{key: weight_of(key)}`` for every key of ``losses``."""
        return {key: self.weight_of(key) for key in losses}

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum ``sum_k weight_of(k) * losses[k]`` that the train step back-propagates."""
        if not losses:
            raise ValueError("criterion.total got an empty loss dict")
        terms = [self.weight_of(key) * value for key, value in losses.items()]
        return torch.stack(terms).sum()

    def __call__(
        self,
        outputs: dict[str, Any],
        targets: list[Target],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the losses.

        Args:
            outputs: the model's output dict (see `kmax_model.model`): "class_logits" [B,N,K+1],
                "mask_logits" [B,N,h,w], "pixel_feature" [B,D,h,w], optional "aux_outputs" (list of dicts
                with the same keys at h x w) and "semantic_logits" [B,C,h',w'].
            targets: one `Target` per image at the ``h x w`` grid.
            generator: optional generator making the Gumbel-top-k pixel sampling reproducible.
        """
        at_input = self.cfg.mask_loss_at == "input"
        _check_targets(outputs, targets, at_input)
        device = outputs["mask_logits"].device
        with torch.autocast(device_type=device.type, enabled=False):
            final = {key: outputs[key].float() for key in ("class_logits", "mask_logits", "pixel_feature")}
            slot_targets = self.build_slot_targets(final, targets)
            points = (
                self._input_points(targets, final["mask_logits"], slot_targets, generator)
                if at_input
                else None
            )
            losses = self._output_losses(final, slot_targets, "", generator, points)
            for index, aux in enumerate(outputs.get("aux_outputs", [])):
                aux = {key: aux[key].float() for key in AUX_KEYS if key in aux}
                aux_targets = (
                    slot_targets if self.cfg.share_final_matching else self.build_slot_targets(aux, targets)
                )
                losses.update(self._output_losses(aux, aux_targets, f"_aux{index}", generator, points))
            if "semantic_logits" in outputs and self.cfg.semantic_weight > 0:
                losses["loss_semantic"] = self._semantic(
                    outputs["semantic_logits"].float(), slot_targets, generator
                )
        return losses

    def _input_points(
        self,
        targets: list[Target],
        final_mask_logits: torch.Tensor,
        slot: SlotTargets,
        generator: torch.Generator | None,
    ) -> InputPoints:
        """The input pixels of this call's mask losses (uniform, or partly hard under the final output)."""
        device = final_mask_logits.device
        index = torch.stack([t["input_index"].to(device=device, dtype=torch.int64) for t in targets])
        cfg = self.cfg
        if cfg.mask_loss_points == 0 or cfg.mask_loss_hard_ratio == 0:
            return sample_input_points(index, cfg.mask_loss_points, generator)
        return sample_hard_input_points(
            index,
            final_mask_logits,
            slot.gt_to_slot,
            cfg.mask_loss_points,
            cfg.mask_loss_hard_ratio,
            cfg.mask_loss_oversample,
            generator,
        )

    def _output_losses(
        self,
        output: dict[str, torch.Tensor],
        slot: SlotTargets,
        suffix: str,
        generator: torch.Generator | None,
        points: InputPoints | None,
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if points is None:  # the reference: dice and mask-ID on the output-stride grid
            mask_logits, mask_targets, mask_valid = output["mask_logits"].flatten(2), slot.masks, slot.valid
        else:
            mask_logits = mask_logits_at(output["mask_logits"], points)  # B x N x K
            mask_targets = slot_targets_at(points, slot.gt_to_slot, mask_logits.shape[1])
            mask_valid = points.valid
        losses: dict[str, torch.Tensor] = {}
        if cfg.pq_class_weight > 0:
            losses["loss_pq_class" + suffix] = pq_class_loss(
                output["class_logits"], slot.classes, slot.class_weights
            )
        if cfg.pq_dice_weight > 0:
            losses["loss_pq_dice" + suffix] = pq_dice_loss(
                mask_logits, mask_targets, mask_valid, slot.dice_weights, cfg.pq_alpha, cfg.dice_smooth
            )
        if cfg.mask_id_weight > 0:
            losses["loss_mask_id" + suffix] = mask_id_loss(mask_logits, mask_targets, mask_valid)
        if cfg.insdis_weight > 0:
            losses["loss_insdis" + suffix] = instance_discrimination_loss(
                output["pixel_feature"].flatten(2),
                slot.gt_masks,
                slot.valid,
                slot.area,
                cfg.insdis_sample_k,
                cfg.insdis_sample_temperature,
                cfg.insdis_temperature,
                generator,
            )
        if cfg.mask_approx_weight > 0 and "reference_logits" in output:
            losses["loss_mask_approx" + suffix] = mask_approximation_loss(
                output["reference_logits"].flatten(2),
                slot.masks,
                slot.valid,
                slot.classes != self.num_classes,
                cfg.mask_approx_terms,
                cfg.dice_smooth,
            )
        return losses

    def _semantic(
        self, semantic_logits: torch.Tensor, slot: SlotTargets, generator: torch.Generator | None
    ) -> torch.Tensor:
        semantic, valid, area = slot.semantic, slot.valid_map, slot.area_map
        grid = tuple(semantic.shape[-2:])
        logit_grid = tuple(semantic_logits.shape[-2:])
        if logit_grid != grid:
            # A coarser semantic head (Cityscapes: os32): subsample the GT with the matching stride, as
            # bytedance aux_semantic_loss does (grids of size k*s+1 align corner to corner).
            strides = {(g - 1) // max(lg - 1, 1) for g, lg in zip(grid, logit_grid)}
            stride = strides.pop() if len(strides) == 1 else 0
            if stride < 1 or any((lg - 1) * stride + 1 != g for g, lg in zip(grid, logit_grid)):
                raise ValueError(
                    f"semantic_logits grid {logit_grid} is not a strided subgrid of the targets' {grid}"
                )
            semantic, valid, area = (x[:, ::stride, ::stride] for x in (semantic, valid, area))
        return semantic_loss(
            semantic_logits.flatten(2),
            semantic.flatten(1),
            valid.flatten(1),
            area.flatten(1),
            self.cfg.semantic_sample_k,
            self.cfg.semantic_sample_temperature,
            IGNORE_INDEX,
            generator,
        )

    @torch.no_grad()
    def build_slot_targets(self, output: dict[str, torch.Tensor], targets: list[Target]) -> SlotTargets:
        """Match ``output`` to ``targets`` and permute / pad the GT to the slots (no gradient, fp32)."""
        class_logits = output["class_logits"].float()
        mask_logits = output["mask_logits"].float()
        batch, num_slots, height, width = mask_logits.shape
        device = mask_logits.device
        num_pixels = height * width
        alpha, eps = self.cfg.pq_alpha, self.cfg.no_object_weight_min
        max_gt = max([int(t["masks"].shape[0]) for t in targets] + [1])

        masks = torch.zeros(batch, num_slots, num_pixels, device=device)
        gt_masks = torch.zeros(batch, max_gt, num_pixels, device=device)
        classes = torch.full((batch, num_slots), self.num_classes, dtype=torch.int64, device=device)
        gt_to_slot = torch.full((batch, max_gt), -1, dtype=torch.int64, device=device)
        dice_weights = torch.zeros(batch, num_slots, device=device)
        valid = torch.stack([t["valid"].to(device=device, dtype=torch.bool) for t in targets]).flatten(1)

        # Unmatched slots: weight of their void target = share of their mask lying on void pixels.
        probs = mask_logits.flatten(2).softmax(dim=1)  # B x N x P
        void = (~valid).float()
        void_ratio = torch.einsum("bnp,bp->bn", probs, void) / (probs.sum(-1) + VOID_RATIO_EPS)
        class_weights = (1.0 - alpha) * void_ratio.clamp(min=eps)

        for b, target in enumerate(targets):
            gt = target["masks"].to(device=device, dtype=torch.float32).flatten(1)  # M x P
            labels = target["labels"].to(device=device, dtype=torch.int64)
            if gt.shape[0] == 0:
                continue
            gt = gt / gt.sum(0, keepdim=True).clamp(min=1.0)  # overlapping masks share a pixel
            gt_masks[b, : gt.shape[0]] = gt
            match: MatchResult = hungarian_match(
                class_logits[b],
                mask_logits[b],
                gt.view(-1, height, width),
                labels,
                valid[b].view(height, width),
            )
            slots, gts = match.slot_indices, match.gt_indices
            masks[b, slots] = gt[gts]
            gt_to_slot[b, gts] = slots
            classes[b, slots] = labels[gts]
            class_weights[b, slots] = alpha * match.matched_dice.clamp(min=eps)
            dice_weights[b, slots] = match.matched_class_prob.clamp(min=eps)

        area = torch.stack([t["area"].to(device=device, dtype=torch.float32) for t in targets])
        semantic = torch.stack([t["semantic"].to(device=device, dtype=torch.int64) for t in targets])
        return SlotTargets(
            masks=masks,
            classes=classes,
            class_weights=class_weights,
            dice_weights=dice_weights,
            valid=valid,
            gt_masks=gt_masks,
            area=area.flatten(1),
            semantic=semantic,
            valid_map=valid.view(batch, height, width),
            area_map=area,
            gt_to_slot=gt_to_slot,
        )


def build_criterion(cfg: KMaXConfig) -> Criterion:
    """The criterion of a model config (uses ``cfg.loss`` and ``cfg.num_classes``)."""
    return Criterion(cfg.loss, cfg.num_classes)
