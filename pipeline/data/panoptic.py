"""Shared conversion: (image bytes, source id map, segments_info) -> canonical record (pipeline.data.records).

Follows deeplab2 data/build_coco_data.py::_generate_panoptic_label @ 64bc1c1a (per segment in JSON
order: contiguous class, thing instances numbered per class from 1 (crowd regions included, flagged
in the segments), stuff instance 0, area checked against the JSON), with void = VOID_LABEL.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.quarantine import (
    TOO_MANY_INSTANCES,
    RecordError,
    check_ids_against_segments,
    check_segments_info,
)
from pipeline.data.records import VOID_LABEL, encode_label, encode_segments


@dataclass(frozen=True)
class ConvertContext:
    """What every record conversion needs (picklable: shipped to Ray workers).

    categories: dataset category id -> (contiguous class id, isthing).
    """

    root: str
    categories: dict[int, tuple[int, bool]]
    label_divisor: int
    max_size: int | None = None


ID_MASK = 0xFFFFFF
"""The 24 bits of an RGB-encoded segment id."""


def png_segment_ids(img: Image.Image) -> np.ndarray:
    """Segment ids of a panoptic PNG as int32 [H, W]: ``R + 256 G + 256^2 B`` (panopticapi rgb2id semantics).

    The one colour-to-id decoder of the project (data preparation and the PQ file path both use it). Any PIL
    mode is decoded through PIL's own conversion to RGB(A), so grey or palette PNGs give their grey / palette
    colours; callers that require a true colour PNG check ``img.mode`` first.
    """
    # PIL's RGB -> RGBA conversion (C) then one little-endian uint32 view: cheaper than three int32
    # multiply-adds (reference_data_and_pq.md §3.6: the id decode is a visible share of a file-path image).
    # The alpha byte lands in the top 8 bits and is masked off.
    rgba = np.asarray(img.convert("RGBA"))
    return (rgba.view("<u4")[..., 0] & np.uint32(ID_MASK)).view(np.int32)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W, 4], alpha ignored) colours -> int32 ids; `png_segment_ids` of an array."""
    return png_segment_ids(Image.fromarray(np.asarray(rgb, dtype=np.uint8)))


def lookup_segments(ids: np.ndarray, seg_ids: np.ndarray):
    """Map every pixel to its segment's position in ``seg_ids`` (-1 for void id 0 and stray ids).

    Returns (pos int64 [H, W], counts per segment, distinct stray non-zero ids). O(HW log S), no np.unique
    with return_inverse (slow at 2 MPx, reference_data_and_pq.md §3.6).
    """
    order = np.argsort(seg_ids, kind="stable")
    keys = seg_ids[order]
    flat = ids.reshape(-1).astype(np.int64)
    if keys.size:
        p = np.searchsorted(keys, flat).clip(0, keys.size - 1)
        hit = keys[p] == flat
        pos = np.where(hit, order[p], -1)
    else:
        hit = np.zeros(flat.shape, bool)
        pos = np.full(flat.shape, -1, np.int64)
    stray = np.unique(flat[~hit & (flat != 0)])
    counts = np.bincount(pos[pos >= 0], minlength=seg_ids.size)
    return pos.reshape(ids.shape), counts, stray


def build_label(
    ids: np.ndarray, segments: list[dict], ctx: ConvertContext, rel: str, check_area: bool = True
):
    """Source id map + segments_info -> (int32 panoptic label, canonical segment dicts) at the source size."""
    check_segments_info(rel, segments, ctx.categories)
    seg_ids = np.asarray([int(s["id"]) for s in segments], dtype=np.int64)
    pos, counts, stray = lookup_segments(ids, seg_ids)
    check_ids_against_segments(rel, ids, seg_ids, counts, stray, segments, check_area)
    values = np.empty(len(segments) + 1, np.int32)
    values[-1] = VOID_LABEL  # pos == -1 indexes the last entry
    out: list[dict] = []
    next_instance: dict[int, int] = {}
    for k, seg in enumerate(segments):
        class_id, isthing = ctx.categories[int(seg["category_id"])]
        instance = 0
        if isthing:
            instance = next_instance.get(class_id, 1)
            next_instance[class_id] = instance + 1
            if instance >= ctx.label_divisor:
                raise RecordError(
                    TOO_MANY_INSTANCES,
                    rel,
                    f"class {class_id} has >= label_divisor={ctx.label_divisor} instances",
                )
        values[k] = class_id * ctx.label_divisor + instance
        out.append(
            {
                "id": int(values[k]),
                "category_id": int(seg["category_id"]),
                "class_id": int(class_id),
                "isthing": bool(isthing),
                "iscrowd": int(seg.get("iscrowd", 0)),
                "area": int(counts[k]),
                "source_id": int(seg["id"]),
            }
        )
    return values[pos], out


def resize_pair(image: Image.Image, label: np.ndarray, max_size: int) -> tuple[Image.Image, np.ndarray]:
    """Shrink so the long side is ``max_size`` (image bilinear, label NEAREST: ids must never blend)."""
    h, w = label.shape
    scale = max_size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = image.convert("RGB").resize((nw, nh), Image.BILINEAR)
    lab = Image.fromarray(label.astype(np.int32)).resize((nw, nh), Image.NEAREST)
    return image, np.asarray(lab, dtype=np.int32)


def finish_record(
    record_id: str,
    file_name: str,
    image_bytes: bytes,
    image: Image.Image,
    label: np.ndarray,
    segments: list[dict],
    ctx: ConvertContext,
) -> dict:
    """Optional resize, then the `pipeline.data.records.RECORD_SCHEMA` row."""
    oh, ow = label.shape
    if ctx.max_size and max(oh, ow) > ctx.max_size:
        image, label = resize_pair(image, label, ctx.max_size)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=6)
        image_bytes = buf.getvalue()
        ids, counts = np.unique(label, return_counts=True)
        area = dict(zip(ids.tolist(), counts.tolist()))
        segments = [dict(s, area=int(area[s["id"]])) for s in segments if s["id"] in area]
    h, w = label.shape
    return {
        "record_id": record_id,
        "file_name": file_name,
        "height": h,
        "width": w,
        "orig_height": oh,
        "orig_width": ow,
        "image": image_bytes,
        "label": encode_label(label),
        "segments": encode_segments(segments),
    }
