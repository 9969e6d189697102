"""Inference from kMaX predictions: panoptic (mask-wise merging), semantic (mIoU) and instance (mask AP).

Panoptic merging follows deeplab2 ``model/post_processor/max_deeplab.py`` L223-250, L332-445 @ 64bc1c1a and
bytedance/kmax-deeplab ``kmax_deeplab/kmax_model.py`` ``panoptic_inference`` @ f8e1d046 (reference_kmax.md
§1.7). Where the two differ (reference_kmax.md §9.8) this module follows deeplab2: class thresholds are
inclusive (``p >= threshold``), and segments smaller than the thing / stuff area limits become void (set
the limits to 0 for bytedance's behaviour). A segment is kept when its pixels not taken by higher-ranked
segments are ``> overlap_threshold * |binary mask|`` (both references).

Label maps are int32 ``class_id * label_divisor + instance`` (stuff instance 0, things 1..n in ranking order)
with `VOID_LABEL` where nothing is pasted; segments are dicts ``{"id", "class_id", "isthing", "area",
"score"}`` (+ ``"category_id"`` when ``category_ids`` is given), per the project's segment contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kmax_model.config_objective import PostProcessConfig
from kmax_model.targets import VOID_LABEL

_EMPTY = -1
"""Canvas value of pixels not yet claimed by a segment during merging."""


def upsample_mask_logits(
    mask_logits: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    valid_size: tuple[int, int] | None = None,
    image_size: tuple[int, int] | None = None,
    resize_align_corners: bool = False,
) -> torch.Tensor:
    """Resize mask logits ``[..., N, h, w]`` bilinearly (align_corners=True) to ``output_size``, crop, and
    optionally resize the crop to the image's own size.

    Args:
        mask_logits: [N, h, w] or [B, N, h, w] logits.
        output_size: (H, W) to resize to (e.g. the padded input size); None keeps ``h x w``.
        valid_size: (H', W') top-left crop applied after resizing (the unpadded image region); None keeps all.
        image_size: (H'', W'') the crop is resized to when the input was a resized copy of the image
            (bilinear; align_corners=``resize_align_corners``: False aligns pixel centres, as detectron2's
            ``sem_seg_postprocess``; bytedance's panoptic path uses True, see `PostProcessConfig`); None keeps
            the crop.
    """
    squeeze = mask_logits.dim() == 3
    logits = mask_logits[None] if squeeze else mask_logits
    if output_size is not None and tuple(output_size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits.float(), size=tuple(output_size), mode="bilinear", align_corners=True)
    if valid_size is not None:
        logits = logits[..., : valid_size[0], : valid_size[1]]
    if image_size is not None and tuple(image_size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(
            logits.float(), size=tuple(image_size), mode="bilinear", align_corners=resize_align_corners
        )
    return logits[0] if squeeze else logits


def _thing_flags(is_thing: Sequence[bool] | torch.Tensor, num_classes: int) -> torch.Tensor:
    flags = torch.as_tensor(is_thing, dtype=torch.bool).flatten().cpu()
    if flags.numel() != num_classes:
        raise ValueError(
            f"is_thing has {flags.numel()} entries but the class logits have {num_classes} real classes"
        )
    return flags


def semantic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    valid_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-pixel class scores ``einsum(softmax(cls)[:, :K], softmax_N(masks))`` for mIoU.

    Args:
        class_logits: [N, K+1] class logits of one image (last = void).
        mask_logits: [N, h, w] mask logits.
        output_size, valid_size: see `upsample_mask_logits`.

    Returns:
        [K, H, W] float32 scores; ``argmax(0)`` is the semantic prediction.
    """
    class_probs = class_logits.float().softmax(-1)[:, :-1]  # N x K
    mask_probs = upsample_mask_logits(mask_logits.float(), output_size, valid_size).softmax(0)
    return torch.einsum("nk,nhw->khw", class_probs, mask_probs)


def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: Sequence[bool] | torch.Tensor,
    label_divisor: int,
    cfg: PostProcessConfig | None = None,
    output_size: tuple[int, int] | None = None,
    valid_size: tuple[int, int] | None = None,
    category_ids: Sequence[int] | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Mask-wise merging of one image's slots into a panoptic label map.

    Steps: ``p, c = max over real classes of softmax(cls)``; ``M = softmax_N(upsampled masks)``;
    binary mask ``B_i = M_i > pixel_confidence_threshold``; mask score = mean of ``M_i`` over ``B_i``;
    slots ranked by ``p^a * score^b`` (descending, stable); a slot is pasted on the still empty part of
    ``B_i`` when ``p >= thing/stuff threshold`` and that part is ``> overlap_threshold * |B_i|``; all slots
    of one stuff class share one segment; segments under the area limits then become void.

    Args:
        class_logits: [N, K+1] class logits (last = void).
        mask_logits: [N, h, w] mask logits.
        is_thing: K booleans, True for thing classes.
        label_divisor: label map value = class_id * label_divisor + instance (instances < label_divisor).
        cfg: thresholds (defaults: `PostProcessConfig()` = COCO).
        output_size, valid_size, image_size: see `upsample_mask_logits` (the label map has the size of the
            crop, or ``image_size`` when given).
        category_ids: optional K original dataset category ids, added to segments as "category_id".

    Returns:
        (label map int32 [H, W], segments) where segments are sorted by id, one per label-map value.
    """
    cfg = cfg or PostProcessConfig()
    num_classes = class_logits.shape[-1] - 1
    thing = _thing_flags(is_thing, num_classes)
    if category_ids is not None and len(category_ids) != num_classes:
        raise ValueError(f"category_ids has {len(category_ids)} entries, expected {num_classes}")
    class_scores, class_ids = class_logits.float().softmax(-1)[:, :-1].max(-1)  # N
    mask_probs = upsample_mask_logits(
        mask_logits.float(), output_size, valid_size, image_size, cfg.resize_align_corners
    ).softmax(0)
    binary = mask_probs > cfg.pixel_confidence_threshold  # N x H x W
    pixel_counts = binary.flatten(1).sum(1)  # N
    mask_scores = (mask_probs * binary).flatten(1).sum(1) / pixel_counts.clamp(min=1)
    rank_scores = class_scores.pow(cfg.reorder_class_weight) * mask_scores.pow(cfg.reorder_mask_weight)
    order = torch.argsort(rank_scores, descending=True, stable=True)

    height, width = mask_probs.shape[-2:]
    canvas = torch.full((height, width), _EMPTY, dtype=torch.int64, device=mask_probs.device)
    segments: list[dict[str, Any]] = []  # internal segment index = position in this list
    stuff_segment: dict[int, int] = {}
    for slot in order.tolist():
        class_id = int(class_ids[slot])
        score = float(class_scores[slot])
        is_thing_class = bool(thing[class_id])
        threshold = cfg.thing_threshold if is_thing_class else cfg.stuff_threshold
        if score < threshold:
            continue
        new_pixels = binary[slot] & (canvas == _EMPTY)
        if int(new_pixels.sum()) <= cfg.overlap_threshold * int(pixel_counts[slot]):
            continue
        if not is_thing_class and class_id in stuff_segment:
            index = stuff_segment[class_id]
            segments[index]["score"] = max(segments[index]["score"], score)
        else:
            index = len(segments)
            segments.append({"class_id": class_id, "isthing": is_thing_class, "score": score})
            if not is_thing_class:
                stuff_segment[class_id] = index
        canvas[new_pixels] = index
    return _finalize(canvas, segments, cfg, label_divisor, category_ids)


def _finalize(
    canvas: torch.Tensor,
    segments: list[dict[str, Any]],
    cfg: PostProcessConfig,
    label_divisor: int,
    category_ids: Sequence[int] | None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Drop segments under the area limits, number thing instances 1..n and write the label map."""
    label_map = torch.full(canvas.shape, VOID_LABEL, dtype=torch.int32, device=canvas.device)
    areas = torch.bincount(canvas[canvas != _EMPTY], minlength=len(segments)).tolist()
    instance_counter: dict[int, int] = {}
    kept: list[dict[str, Any]] = []
    for index, segment in enumerate(segments):
        area = int(areas[index]) if index < len(areas) else 0
        limit = cfg.thing_area_limit if segment["isthing"] else cfg.stuff_area_limit
        if area == 0 or area < limit:
            continue
        class_id = segment["class_id"]
        instance = 0
        if segment["isthing"]:
            instance = instance_counter.get(class_id, 0) + 1
            instance_counter[class_id] = instance
            if instance >= label_divisor:
                raise ValueError(
                    f"more than {label_divisor - 1} instances of class {class_id}: raise label_divisor"
                )
        value = class_id * label_divisor + instance
        label_map[canvas == index] = value
        out = {
            "id": value,
            "class_id": class_id,
            "isthing": segment["isthing"],
            "area": area,
            "score": segment["score"],
        }
        if category_ids is not None:
            out["category_id"] = int(category_ids[class_id])
        kept.append(out)
    kept.sort(key=lambda s: s["id"])
    return label_map, kept


def instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: Sequence[bool] | torch.Tensor,
    cfg: PostProcessConfig | None = None,
    output_size: tuple[int, int] | None = None,
    valid_size: tuple[int, int] | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Scored instance masks for mask AP (bytedance ``instance_inference``, restricted to thing classes).

    The ``max_instances`` best (slot, thing class) pairs by class probability are kept; mask =
    ``softmax_N(masks) > pixel_confidence_threshold``; score = class prob * mean mask prob inside the mask.
    ``output_size``, ``valid_size``, ``image_size``: see `upsample_mask_logits` (as `panoptic_inference`).

    Returns:
        {"masks": bool [n, H, W], "scores": float32 [n] (descending), "class_ids": int64 [n],
        "slots": int64 [n]} with ``n <= max_instances``.
    """
    cfg = cfg or PostProcessConfig()
    num_classes = class_logits.shape[-1] - 1
    thing = _thing_flags(is_thing, num_classes).to(class_logits.device)
    class_probs = class_logits.float().softmax(-1)[:, :-1]  # N x K
    mask_probs = upsample_mask_logits(
        mask_logits.float(), output_size, valid_size, image_size, cfg.resize_align_corners
    ).softmax(0)
    thing_classes = torch.nonzero(thing).flatten()  # T
    pair_scores = class_probs[:, thing_classes].flatten()  # N*T, slot-major
    k = min(cfg.max_instances, pair_scores.numel())
    top_scores, top = pair_scores.topk(k)
    slots = top // max(thing_classes.numel(), 1)
    class_ids = thing_classes[top % max(thing_classes.numel(), 1)]
    masks = mask_probs[slots] > cfg.pixel_confidence_threshold  # n x H x W
    inside = masks.flatten(1).sum(1)
    mean_inside = (mask_probs[slots] * masks).flatten(1).sum(1) / inside.clamp(min=1)
    scores = top_scores * mean_inside
    order = torch.argsort(scores, descending=True, stable=True)
    return {
        "masks": masks[order],
        "scores": scores[order],
        "class_ids": class_ids[order].to(torch.int64),
        "slots": slots[order].to(torch.int64),
    }


def panoptic_inference_batch(
    outputs: dict[str, Any],
    is_thing: Sequence[bool] | torch.Tensor,
    label_divisor: int,
    cfg: PostProcessConfig | None = None,
    output_size: tuple[int, int] | None = None,
    valid_sizes: Sequence[tuple[int, int] | None] | None = None,
    category_ids: Sequence[int] | None = None,
) -> list[tuple[torch.Tensor, list[dict[str, Any]]]]:
    """`panoptic_inference` on every image of a model output dict (uses "class_logits", "mask_logits")."""
    batch = outputs["class_logits"].shape[0]
    sizes = list(valid_sizes) if valid_sizes is not None else [None] * batch
    if len(sizes) != batch:
        raise ValueError(f"valid_sizes has {len(sizes)} entries for a batch of {batch}")
    return [
        panoptic_inference(
            outputs["class_logits"][b],
            outputs["mask_logits"][b],
            is_thing,
            label_divisor,
            cfg,
            output_size,
            sizes[b],
            category_ids,
        )
        for b in range(batch)
    ]
