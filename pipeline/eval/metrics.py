"""Semantic mIoU (confusion matrix) and mask AP (pycocotools COCOeval, iouType "segm").

mIoU follows the Cityscapes pixel-level evaluation (``evalPixelLevelSemanticLabeling``, cityscapesScripts
@ 0bcc4a72, shared/docs/reference_data_and_pq.md §5): one integer confusion matrix summed over the split;
pixels whose ground truth is ignored never count; a prediction outside the evaluated classes (void, 255) is a
false negative of the ground-truth class; ``IoU = TP / (TP + FP + FN)``; classes with an empty denominator are
left out of the mean (None here, NaN there).

Mask AP is COCO-style AP (deeplab2 ``evaluation/coco_instance_ap.py`` @ 64bc1c1a uses the same pycocotools
call): per-image instances are run-length encoded where they are produced (small, picklable), then one
in-memory COCO ground truth + results pair is evaluated. This is not the Cityscapes-official instance AP
(cityscapesScripts ``evalInstanceLevelSemanticLabeling``), which ignores GT instances under 100 px.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

CITYSCAPES_IGNORE = 255
"""Ignore label of Cityscapes train-id semantic maps."""

COCO_AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""The first six ``COCOeval.stats`` (segm), in order."""


def confusion_matrix(
    gt: Any, pred: Any, num_classes: int, ignore_label: int = CITYSCAPES_IGNORE
) -> np.ndarray:
    """Integer confusion matrix of one semantic prediction.

    Args:
        gt: int [H, W] ground-truth class ids in 0..num_classes-1; ``ignore_label`` (or any value outside
            0..num_classes-1) is not evaluated.
        pred: int [H, W] predicted class ids; values outside 0..num_classes-1 land in the extra last column
            (a miss of the ground-truth class, as a void prediction in the official script).
        num_classes: K.

    Returns:
        int64 [K, K + 1]: rows ground truth, columns prediction (+ "no valid class").
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    gt = np.asarray(gt).astype(np.int64, copy=False).ravel()
    pred = np.asarray(pred).astype(np.int64, copy=False).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"semantic maps differ in size: gt {gt.size} pixels, pred {pred.size} pixels")
    valid = (gt >= 0) & (gt < num_classes) & (gt != ignore_label)
    g = gt[valid]
    p = pred[valid]
    p = np.where((p >= 0) & (p < num_classes), p, num_classes)
    counts = np.bincount(g * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def miou_from_confusion(matrix: np.ndarray) -> dict[str, Any]:
    """mIoU of a summed ``[K, K + 1]`` confusion matrix.

    Returns:
        {"miou": mean over classes with a non-empty denominator (None if none),
        "per_class": {k: IoU or None}}.
    """
    m = np.asarray(matrix, dtype=np.int64)
    k = m.shape[0]
    if m.ndim != 2 or m.shape[1] != k + 1:
        raise ValueError(f"confusion matrix must be [K, K+1], got {m.shape}")
    tp = np.diag(m[:, :k])
    fn = m.sum(axis=1) - tp
    fp = m[:, :k].sum(axis=0) - tp
    denom = tp + fp + fn
    per_class = {c: (float(tp[c]) / float(denom[c]) if denom[c] > 0 else None) for c in range(k)}
    valid = [v for v in per_class.values() if v is not None]
    return {"miou": float(np.mean(valid)) if valid else None, "per_class": per_class}


@dataclass
class ImageInstances:
    """Instances of one image for mask AP, run-length encoded (picklable, small).

    Attributes:
        image_id: int id used in the COCO evaluation (unique per image; the dataset index works).
        height, width: image size.
        gt: [{"category_id", "rle", "iscrowd"}] ground-truth thing instances (crowd regions flagged).
        pred: [{"category_id", "rle", "score"}] predicted instances.
    """

    image_id: int
    height: int
    width: int
    gt: list[dict[str, Any]] = field(default_factory=list)
    pred: list[dict[str, Any]] = field(default_factory=list)


def encode_mask(mask: Any) -> dict[str, Any]:
    """Binary [H, W] mask -> COCO compressed RLE with ``counts`` as str (JSON-safe)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_segm_inputs(
    images: Iterable[ImageInstances], categories: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The COCO ground-truth dataset dict and results list of the given images (what one would write to
    ``instances.json`` and ``results.json``). ``categories``: [{"id", ...}] of the evaluated thing classes."""
    cat_ids = {int(c["id"]) for c in categories}
    gt: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": i} for i in sorted(cat_ids)]}
    results: list[dict[str, Any]] = []
    for img in images:
        gt["images"].append({"id": int(img.image_id), "height": int(img.height), "width": int(img.width)})
        for inst in img.gt:
            if int(inst["category_id"]) not in cat_ids:
                continue
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,  # pycocotools wants ids >= 1
                    "image_id": int(img.image_id),
                    "category_id": int(inst["category_id"]),
                    "segmentation": inst["rle"],
                    "area": float(mask_utils.area(inst["rle"])),
                    "bbox": mask_utils.toBbox(inst["rle"]).tolist(),
                    "iscrowd": int(inst.get("iscrowd", 0)),
                }
            )
        for inst in img.pred:
            if int(inst["category_id"]) not in cat_ids:
                continue
            results.append(
                {
                    "image_id": int(img.image_id),
                    "category_id": int(inst["category_id"]),
                    "segmentation": inst["rle"],
                    "score": float(inst["score"]),
                }
            )
    return gt, results


def mask_ap(
    images: Iterable[ImageInstances], categories: Sequence[Mapping[str, Any]]
) -> dict[str, float | None]:
    """COCO mask AP of the thing classes with pycocotools ``COCOeval(iouType="segm")`` (its printing muted).

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"} as fractions; None where COCOeval has nothing to score
        (-1: no ground-truth instance in that range). With ground truth but no prediction, AP is 0.0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict, results = coco_segm_inputs(images, categories)
    if not any(a["iscrowd"] == 0 for a in gt_dict["annotations"]):
        return dict.fromkeys(COCO_AP_NAMES)
    if not results:
        return dict.fromkeys(COCO_AP_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {
        name: (float(v) if v >= 0 else None) for name, v in zip(COCO_AP_NAMES, ev.stats[: len(COCO_AP_NAMES)])
    }
