"""COCO panoptic reader (also used for any panoptic JSON + PNG folder, e.g. Cityscapes panoptic).

Layout (reference_data_and_pq.md §1.1)::

    ROOT/annotations/panoptic_{split}2017.json
    ROOT/annotations/panoptic_{split}2017/*.png
    ROOT/{split}2017/*.jpg

Contiguous class ids follow the detectron2 "standard" convention: the position of the category in the
JSON ``categories`` list (COCO: things 0..79, stuff 80..132 in the official file).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.panoptic import ConvertContext, build_label, finish_record, png_segment_ids
from pipeline.data.quarantine import (
    DUPLICATE_IMAGE_ID,
    NO_IMAGE_ENTRY,
    RecordError,
    check_size,
    open_image,
    read_bytes,
)

DEFAULT_LABEL_DIVISOR = 256
"""deeplab2's COCO divisor (data/coco_constants); at most 255 instances per class and image."""


@dataclass
class Index:
    """What a reader hands to `pipeline.data.prepare`: rows to convert, index-level rejects, categories."""

    rows: list[dict]
    quarantine: list[dict]
    categories: list[dict]  # manifest entries {class_id, category_id, name, isthing, color}
    label_divisor: int


def categories_from_json(cats: list[dict], class_of: Callable[[dict], int] | None = None) -> list[dict]:
    out = []
    for pos, c in enumerate(cats):
        out.append(
            {
                "class_id": pos if class_of is None else class_of(c),
                "category_id": int(c["id"]),
                "name": c.get("name", str(c["id"])),
                "isthing": bool(c.get("isthing", 0)),
                "color": list(c.get("color", [0, 0, 0])),
            }
        )
    return sorted(out, key=lambda c: c["class_id"])


def panoptic_json_index(
    root: Path,
    json_path: Path,
    png_dir: Path,
    image_path: Callable[[dict, dict], Path],
    categories: list[dict],
    label_divisor: int,
) -> Index:
    """Rows from a panoptic JSON: one per annotation, in file order, joined with ``images`` on image_id.

    Duplicate image ids keep their first annotation; the later ones are quarantined.
    """
    doc = json.loads(json_path.read_text())
    images = {}
    for im in doc.get("images", []):
        images.setdefault(str(im["id"]), im)
    rows, rejects, first_at = [], [], {}
    for i, ann in enumerate(doc["annotations"]):
        rid = str(ann["image_id"])
        png = png_dir / ann["file_name"]
        rel_png = str(png.relative_to(root)) if png.is_relative_to(root) else str(png)
        if rid in first_at:
            rejects.append(
                {
                    "record_id": rid,
                    "file": rel_png,
                    "code": DUPLICATE_IMAGE_ID,
                    "reason": f"image id {rid} already used by annotation #{first_at[rid]} (this is #{i})",
                    "order": i,
                }
            )
            continue
        first_at[rid] = i
        im = images.get(rid)
        if im is None:
            rejects.append(
                {
                    "record_id": rid,
                    "file": rel_png,
                    "code": NO_IMAGE_ENTRY,
                    "reason": f"image id {rid} has no entry in the JSON 'images' list",
                    "order": i,
                }
            )
            continue
        img = image_path(im, ann)
        rows.append(
            {
                "order": i,
                "record_id": rid,
                "file_name": str(img.relative_to(root)) if img.is_relative_to(root) else str(img),
                "label_file": rel_png,
                "height": int(im.get("height", -1)),
                "width": int(im.get("width", -1)),
                "segments_info": json.dumps(ann["segments_info"]),
            }
        )
    return Index(rows, rejects, categories, label_divisor)


def build_index(root: str | Path, split: str, label_divisor: int = DEFAULT_LABEL_DIVISOR) -> Index:
    root = Path(root)
    json_path = root / "annotations" / f"panoptic_{split}2017.json"
    if not json_path.is_file():
        raise FileNotFoundError(f"COCO panoptic annotation file not found: {json_path}")
    doc_cats = json.loads(json_path.read_text())["categories"]
    img_dir = root / f"{split}2017"

    def image_path(im: dict, ann: dict) -> Path:
        name = im.get("file_name") or Path(ann["file_name"]).with_suffix(".jpg").name
        return img_dir / name

    return panoptic_json_index(
        root,
        json_path,
        root / "annotations" / f"panoptic_{split}2017",
        image_path,
        categories_from_json(doc_cats),
        label_divisor,
    )


def category_lookup(categories: list[dict]) -> dict[int, tuple[int, bool]]:
    return {c["category_id"]: (c["class_id"], c["isthing"]) for c in categories}


def convert_png_row(row: dict, ctx: ConvertContext) -> dict:
    """One index row (image + id PNG + segments_info) -> a canonical record; raises RecordError."""
    root = Path(ctx.root)
    img_rel, png_rel = row["file_name"], row["label_file"]
    image_bytes = read_bytes(root / img_rel, img_rel)
    png_bytes = read_bytes(root / png_rel, png_rel)
    image = open_image(image_bytes, img_rel)
    png = open_image(png_bytes, png_rel)
    png_hw = (png.height, png.width)
    if row["height"] > 0:
        check_size(png_rel, "PNG", png_hw, (row["height"], row["width"]))
    check_size(img_rel, "image", (image.height, image.width), png_hw)
    ids = png_segment_ids(png)
    label, segments = build_label(ids, json.loads(row["segments_info"]), ctx, png_rel)
    return finish_record(row["record_id"], img_rel, image_bytes, image, label, segments, ctx)


__all__ = ["Index", "RecordError", "build_index", "category_lookup", "convert_png_row", "panoptic_json_index"]
