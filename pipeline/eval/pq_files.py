"""PQ on COCO panoptic files: ``gt.json`` + PNG folder against ``pred.json`` + PNG folder.

The file-format side of `pipeline.eval.pq`: reading the JSONs, pairing images by ``image_id`` in ground-truth
annotation order (as the official ``pq_compute``), decoding PNG ids (``R + 256 G + 256^2 B``, void = 0) and
feeding `pq_image_stats`. Errors name the image id and the PNG file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.eval.pq import (
    PNG_VOID_ID,
    Category,
    ImagePQStats,
    PQInputError,
    normalize_categories,
    pq_image_stats,
    reduce_pq_stats,
)

ID_MASK = 0xFFFFFF
"""The 24 bits of an RGB-encoded segment id."""


def load_json(obj: Any, what: str) -> dict[str, Any]:
    """A COCO panoptic JSON given as a path or an already loaded dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    path = Path(obj)
    try:
        with path.open() as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PQInputError(f"{what} JSON {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise PQInputError(f"{what} JSON {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "annotations" not in data:
        raise PQInputError(f"{what} JSON {path} has no 'annotations' list")
    return data


def read_id_png(path: Path) -> np.ndarray:
    """Segment ids of a COCO panoptic PNG as int32 [H, W]: ``R + 256 G + 256^2 B`` (panopticapi rgb2id)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA"):
                raise PQInputError(
                    f"PNG {path} must be 8-bit RGB (ids as R + 256 G + 256^2 B), got mode {img.mode}"
                )
            # PIL's RGB -> RGBA conversion (C) then one little-endian uint32 view: cheaper than three
            # multiply-adds; the alpha byte is masked off.
            rgba = np.asarray(img.convert("RGBA"))
    except FileNotFoundError:
        raise PQInputError(f"PNG {path} does not exist") from None
    except OSError as exc:
        raise PQInputError(f"PNG {path} cannot be decoded: {exc}") from None
    ids = rgba.view("<u4")[..., 0] & np.uint32(ID_MASK)
    return ids.view(np.int32)


@dataclass(frozen=True)
class FilePair:
    """One image to evaluate: its position, id and the two PNG paths with their segment lists."""

    index: int
    image_id: Any
    gt_png: Path
    gt_segments: list[dict[str, Any]]
    pred_png: Path
    pred_segments: list[dict[str, Any]]


def pair_annotations(
    gt: dict[str, Any], gt_folder: Any, pred: dict[str, Any], pred_folder: Any
) -> list[FilePair]:
    """Pair every GT annotation (in GT order) with the prediction of the same ``image_id``.

    Raises PQInputError for a GT image without prediction (the official ``Exception``) and for an
    ``image_id`` listed twice on either side (the official tool silently keeps the last prediction).
    Extra predicted images are ignored, as in the official tool.
    """
    preds: dict[Any, dict[str, Any]] = {}
    for ann in pred["annotations"]:
        if ann["image_id"] in preds:
            raise PQInputError(f"prediction JSON lists image id {ann['image_id']!r} twice")
        preds[ann["image_id"]] = ann
    pairs, seen = [], set()
    for i, ann in enumerate(gt["annotations"]):
        image_id = ann["image_id"]
        if image_id in seen:
            raise PQInputError(f"ground-truth JSON lists image id {image_id!r} twice")
        seen.add(image_id)
        if image_id not in preds:
            raise PQInputError(f"no prediction for the image with id {image_id!r} (gt {ann['file_name']})")
        p = preds[image_id]
        pairs.append(
            FilePair(
                index=i,
                image_id=image_id,
                gt_png=Path(gt_folder) / ann["file_name"],
                gt_segments=list(ann["segments_info"]),
                pred_png=Path(pred_folder) / p["file_name"],
                pred_segments=list(p["segments_info"]),
            )
        )
    return pairs


def file_pair_stats(pair: FilePair, categories: Mapping[int, Category]) -> ImagePQStats:
    """Decode both PNGs of one pair and compute its integer statistics."""
    return pq_image_stats(
        read_id_png(pair.gt_png),
        pair.gt_segments,
        read_id_png(pair.pred_png),
        pair.pred_segments,
        categories,
        index=pair.index,
        image_id=pair.image_id,
        void_label=PNG_VOID_ID,
        name=f"image {pair.image_id!r} (prediction {pair.pred_png})",
    )


def pq_compute_files(
    gt_json: Any, gt_folder: Any, pred_json: Any, pred_folder: Any, chunks: int | None = None
) -> dict[str, Any]:
    """PQ of COCO panoptic files, equal bit for bit to panopticapi ``pq_compute`` run on ``chunks`` processes.

    Args:
        gt_json, pred_json: paths to (or loaded dicts of) COCO panoptic JSONs; categories come from the GT.
        gt_folder, pred_folder: folders of the PNGs named by each annotation's ``file_name``.
        chunks: the official tool's process count to emulate (None: ``os.cpu_count()``, what it would use
            on this machine). Only the last bits of pq/sq depend on it.

    Returns:
        The official result dict (see `pipeline.eval.pq.reduce_pq_stats`); per_class keys are int category
        ids.
    """
    gt = load_json(gt_json, "ground-truth")
    pred = load_json(pred_json, "prediction")
    if "categories" not in gt:
        raise PQInputError("ground-truth JSON has no 'categories'")
    categories = normalize_categories(gt["categories"])
    by_id = {c.id: c for c in categories}
    stats = [file_pair_stats(p, by_id) for p in pair_annotations(gt, gt_folder, pred, pred_folder)]
    return reduce_pq_stats(stats, categories, chunks=chunks)
