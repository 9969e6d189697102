"""Typed configuration of the training objective (losses, matching) and of inference (post-processing).

`kmax_model.config.KMaXConfig` holds one `LossConfig` (field ``loss``) and one `PostProcessConfig`
(field ``postprocess``). Defaults follow the released COCO configs (reference_kmax.md §4, §1.7):
deeplab2 ``configs/coco/kmax_deeplab/*.textproto`` and bytedance/kmax-deeplab
``configs/coco/panoptic_segmentation/*.yaml`` @ f8e1d046.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

PostProcessPreset = Literal["coco", "cityscapes", "ade20k"]
MaskLossAt = Literal["grid", "input"]
MASK_LOSS_AT = ("grid", "input")
MaskApproxTerms = Literal["dice", "bce", "dice_bce"]
MASK_APPROX_TERMS = ("dice", "bce", "dice_bce")

LOSS_WEIGHT_FIELDS = (
    "pq_class_weight",
    "pq_dice_weight",
    "mask_id_weight",
    "insdis_weight",
    "semantic_weight",
    "mask_approx_weight",
)
"""The `LossConfig` fields that weight one loss term each."""


def _check_non_negative(prefix: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{prefix}.{name} must be a finite number >= 0, got {value!r}")


def _check_positive(prefix: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{prefix}.{name} must be a finite number > 0, got {value!r}")


def _check_unit_interval(prefix: str, name: str, value: float, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0
    if ok and open_low:
        ok = value > 0.0
    if not ok:
        bound = "(0, 1]" if open_low else "[0, 1]"
        raise ValueError(f"{prefix}.{name} must lie in {bound}, got {value!r}")


def _check_int(prefix: str, name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{prefix}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class LossConfig:
    """Weights and hyper-parameters of the kMaX training objective (reference_kmax.md §4).

    The criterion returns UNWEIGHTED losses; the train step sums ``weight * loss`` using the weights
    below (`kmax_model.criterion.Criterion.weight_of`). A weight of 0 disables the term (the criterion
    then does not compute it).

    Attributes:
        pq_class_weight: weight of the PQ-style classification term (3.0 = the PQ loss weight).
        pq_dice_weight: weight of the PQ-style mask dice term (3.0).
        mask_id_weight: weight of the mask-ID cross-entropy over slots (0.3).
        insdis_weight: weight of the pixel-wise instance discrimination (contrastive) loss (1.0).
        semantic_weight: weight of the auxiliary semantic cross-entropy on ``semantic_logits`` (1.0).
        pq_alpha: alpha of the PQ-style loss: matched slots' class CE is weighted by ``alpha * dice`` and
            the dice term by ``alpha / N``; unmatched slots' void CE by ``(1 - alpha) * void_ratio`` (0.75).
        no_object_weight_min: lower clamp of the stop-gradient loss weights (matched dice, matched
            class probability, unmatched void ratio); bytedance NO_OBJECT_WEIGHT = 1e-5.
        dice_smooth: additive smoothing of the dice loss numerator and denominator (1.0).
        insdis_sample_k: number of pixels sampled per image (Gumbel top-k) for instance discrimination
            (4096 COCO / Cityscapes).
        insdis_sample_temperature: temperature T_s of the sampling logits ``T_s * log(P / area)``;
            T_s > 1 biases the sample towards small objects (1.5 COCO; 0.6 Cityscapes).
        insdis_temperature: temperature tau of the pixel-embedding similarities ``f.f' / tau`` (0.3).
        semantic_sample_k: number of non-void pixels sampled per image for the auxiliary semantic loss;
            0 uses every pixel (4096 COCO; 0 Cityscapes).
        semantic_sample_temperature: sampling temperature of the semantic loss (2.0).
        share_final_matching: match once on the final output and reuse that assignment (and the PQ-style
            loss weights derived from it) for every auxiliary decoder-layer output, as both reference
            implementations do (reference_kmax.md §9.1). False re-matches each output on its own
            predictions (an ablation).
        mask_loss_at: where the dice and mask-ID terms are evaluated: "grid" = the output-stride grid, as
            both references do; "input" = at input pixels, the mask logits read as inference upsamples
            them (kmax_model.mask_points; a departure from the references that lets the loss see boundaries
            between grid points). Needs targets with ``input_index``.
        mask_loss_points: with ``mask_loss_at = "input"``, the number of input pixels sampled per image
            (12544 = 112 x 112, Mask2Former's number of points); 0 reads every pixel. Cost measured on one
            CPU thread (criterion forward + backward, one 433 x 641 image, 32 slots, 7 outputs): grid 0.17 s,
            16384 points 0.32 s, every pixel 5.3 s.
        mask_loss_hard_ratio: with sampled input points, the fraction of them chosen as the hardest of
            ``mask_loss_oversample x mask_loss_points`` uniform candidates (lowest softmax probability of
            the matched slot under the final output), the rest uniform among the leftover candidates;
            0 = uniform sampling. Mask2Former's importance sampling uses 0.75 with oversample 3.
        mask_loss_oversample: candidates per point for the hard-point choice (>= 1).
        mask_approx_weight: weight of CMT-DeepLab's mask-approximation loss as reconstructed
            (kmax_model.losses.mask_approximation_loss): every decoder layer's reference mask against the GT
            mask of its matched slot. Computed only for outputs that have ``reference_logits``
            (``decoder.assignment = "cmt"`` with ``decoder.cmt.reference_mask``); 0 = off. Our choice: 1.0
            (the paper's weight is not recoverable; the weight of the other CMT-DeepLab loss,
            instance discrimination).
        mask_approx_terms: "dice", "bce" or "dice_bce" (their sum; our choice, the sigmoid dice + BCE pair of
            per-query binary mask losses, as Mask2Former's ``dice_loss`` + ``sigmoid_ce_loss``,
            facebookresearch/Mask2Former ``mask2former/modeling/criterion.py`` @ 161be514) of the
            mask-approximation loss.
    """

    pq_class_weight: float = 3.0
    pq_dice_weight: float = 3.0
    mask_id_weight: float = 0.3
    insdis_weight: float = 1.0
    semantic_weight: float = 1.0
    pq_alpha: float = 0.75
    no_object_weight_min: float = 1e-5
    dice_smooth: float = 1.0
    insdis_sample_k: int = 4096
    insdis_sample_temperature: float = 1.5
    insdis_temperature: float = 0.3
    semantic_sample_k: int = 4096
    semantic_sample_temperature: float = 2.0
    share_final_matching: bool = True
    mask_loss_at: MaskLossAt = "grid"
    mask_loss_points: int = 12544
    mask_loss_hard_ratio: float = 0.0
    mask_loss_oversample: float = 3.0
    mask_approx_weight: float = 1.0
    mask_approx_terms: MaskApproxTerms = "dice_bce"

    def __post_init__(self) -> None:
        if self.mask_loss_at not in MASK_LOSS_AT:
            raise ValueError(f"loss.mask_loss_at must be one of {MASK_LOSS_AT}, got {self.mask_loss_at!r}")
        if self.mask_approx_terms not in MASK_APPROX_TERMS:
            raise ValueError(
                f"loss.mask_approx_terms must be one of {MASK_APPROX_TERMS}, got {self.mask_approx_terms!r}"
            )
        _check_int("loss", "mask_loss_points", self.mask_loss_points, 0)
        _check_unit_interval("loss", "mask_loss_hard_ratio", self.mask_loss_hard_ratio)
        oversample = self.mask_loss_oversample
        if not (isinstance(oversample, (int, float)) and math.isfinite(oversample) and oversample >= 1.0):
            raise ValueError(f"loss.mask_loss_oversample must be >= 1, got {self.mask_loss_oversample}")
        if not isinstance(self.share_final_matching, bool):
            raise ValueError(f"loss.share_final_matching must be a bool, got {self.share_final_matching!r}")
        for name in LOSS_WEIGHT_FIELDS:
            _check_non_negative("loss", name, getattr(self, name))
        _check_unit_interval("loss", "pq_alpha", self.pq_alpha)
        _check_unit_interval("loss", "no_object_weight_min", self.no_object_weight_min, open_low=True)
        _check_non_negative("loss", "dice_smooth", self.dice_smooth)
        _check_int("loss", "insdis_sample_k", self.insdis_sample_k, 2)
        _check_positive("loss", "insdis_sample_temperature", self.insdis_sample_temperature)
        _check_positive("loss", "insdis_temperature", self.insdis_temperature)
        _check_int("loss", "semantic_sample_k", self.semantic_sample_k, 0)
        _check_positive("loss", "semantic_sample_temperature", self.semantic_sample_temperature)


@dataclass
class PostProcessConfig:
    """Mask-wise panoptic merging thresholds (reference_kmax.md §1.7; defaults = COCO).

    Comparisons follow deeplab2 (``>=`` for the class thresholds, segments dropped when the newly
    pasted area is ``<= overlap_threshold * |mask|``) and deeplab2's area limits are applied
    (bytedance has none; set them to 0 to reproduce it).

    Attributes:
        thing_threshold: minimum class probability of a kept thing segment (0.7 COCO, 0.5 Cityscapes).
        stuff_threshold: minimum class probability of a kept stuff segment (0.5 COCO, 0.3 Cityscapes).
        overlap_threshold: a segment is dropped when its pixels not already taken by higher-ranked
            segments are ``<= overlap_threshold`` times its binary mask area (0.8 COCO, 0.9 Cityscapes).
        pixel_confidence_threshold: a slot's binary mask is ``softmax_N(mask_logits) > threshold`` (0.4).
        reorder_class_weight: exponent a of the class probability in the ranking ``p^a * mask_score^b``.
        reorder_mask_weight: exponent b of the mean in-mask probability in the ranking.
        thing_area_limit: thing segments with fewer pixels (at the output size) become void (400 COCO).
        stuff_area_limit: stuff segments with fewer pixels become void (6400 COCO).
        max_instances: number of (slot, class) pairs kept by instance inference for mask AP (100).
        resize_align_corners: how the mask logits of a resized input are resized back to the stored image
            size (kmax_model.postprocess.upsample_mask_logits): False aligns pixel centres; bytedance's
            ``kMaXDeepLab.forward`` (``kmax_model.py`` @ f8e1d046) uses align_corners=True there (its
            padded input is 1281 wide, odd), which an imported official checkpoint's config sets.
    """

    thing_threshold: float = 0.7
    stuff_threshold: float = 0.5
    overlap_threshold: float = 0.8
    pixel_confidence_threshold: float = 0.4
    reorder_class_weight: float = 1.0
    reorder_mask_weight: float = 1.0
    thing_area_limit: int = 400
    stuff_area_limit: int = 6400
    max_instances: int = 100
    resize_align_corners: bool = False

    def __post_init__(self) -> None:
        for name in ("thing_threshold", "stuff_threshold", "overlap_threshold", "pixel_confidence_threshold"):
            _check_unit_interval("postprocess", name, getattr(self, name))
        _check_non_negative("postprocess", "reorder_class_weight", self.reorder_class_weight)
        _check_non_negative("postprocess", "reorder_mask_weight", self.reorder_mask_weight)
        _check_int("postprocess", "thing_area_limit", self.thing_area_limit, 0)
        _check_int("postprocess", "stuff_area_limit", self.stuff_area_limit, 0)
        _check_int("postprocess", "max_instances", self.max_instances, 1)

    @classmethod
    def coco(cls) -> PostProcessConfig:
        """deeplab2 / bytedance COCO values (reference_kmax.md §1.7 table)."""
        return cls(
            thing_threshold=0.7,
            stuff_threshold=0.5,
            overlap_threshold=0.8,
            reorder_class_weight=1.0,
            reorder_mask_weight=1.0,
            thing_area_limit=400,
            stuff_area_limit=6400,
        )

    @classmethod
    def cityscapes(cls) -> PostProcessConfig:
        """deeplab2 / bytedance Cityscapes values (reference_kmax.md §1.7 table)."""
        return cls(
            thing_threshold=0.5,
            stuff_threshold=0.3,
            overlap_threshold=0.9,
            reorder_class_weight=1.0,
            reorder_mask_weight=0.0,
            thing_area_limit=256,
            stuff_area_limit=2048,
        )

    @classmethod
    def ade20k(cls) -> PostProcessConfig:
        """deeplab2 / bytedance ADE20K values (reference_kmax.md §1.7 table)."""
        return cls(
            thing_threshold=0.4,
            stuff_threshold=0.4,
            overlap_threshold=0.8,
            reorder_class_weight=1.0,
            reorder_mask_weight=1.0,
            thing_area_limit=0,
            stuff_area_limit=0,
        )

    @classmethod
    def for_dataset(cls, name: PostProcessPreset) -> PostProcessConfig:
        """The values of a named dataset ("coco", "cityscapes", "ade20k"); raises on an unknown name."""
        builders = {"coco": cls.coco, "cityscapes": cls.cityscapes, "ade20k": cls.ade20k}
        if name not in builders:
            raise ValueError(f"postprocess preset must be one of {sorted(builders)}, got {name!r}")
        return builders[name]()


def cityscapes_loss_config() -> LossConfig:
    """The Cityscapes loss settings: insdis sample temperature 0.6, semantic loss on all pixels."""
    return LossConfig(insdis_sample_temperature=0.6, semantic_sample_k=0)
