"""Cityscapes readers: raw gtFine (instanceIds/labelIds PNGs) and the panoptic JSON of createPanopticImgs.

Raw gtFine (reference_data_and_pq.md §2.1-2.3)::

    ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_{instanceIds,labelIds}.png

Conversion rules, chosen to agree with cityscapesscripts preparation/createPanopticImgs.py @ 0bcc4a72:
one segment per distinct instanceIds value v (sorted); label id = v if v < 1000 else v // 1000; labels
that are ignored in evaluation (caravan, trailer, license plate, ...) become void; v < 1000 on a thing
class is a "group" region -> crowd; segment source_id = v. Contiguous class = trainId (0..18), things =
trainIds 11..18, ``category_id`` = the label id (or the trainId for a ``*_trainId.json`` panoptic JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.data.coco import Index, panoptic_json_index
from pipeline.data.panoptic import ConvertContext, build_label, finish_record
from pipeline.data.quarantine import LABEL_MISMATCH, RecordError, check_size, open_image, read_bytes

DEFAULT_LABEL_DIVISOR = 1000
GROUP_LIMIT = 1000
"""instanceIds values below this are bare label ids (stuff or crowd "group" regions)."""

# (label id, trainId, name, isthing, colour) of the 19 evaluated classes (cityscapesscripts labels.py).
EVAL_CLASSES = (
    (7, 0, "road", False, (128, 64, 128)),
    (8, 1, "sidewalk", False, (244, 35, 232)),
    (11, 2, "building", False, (70, 70, 70)),
    (12, 3, "wall", False, (102, 102, 156)),
    (13, 4, "fence", False, (190, 153, 153)),
    (17, 5, "pole", False, (153, 153, 153)),
    (19, 6, "traffic light", False, (250, 170, 30)),
    (20, 7, "traffic sign", False, (220, 220, 0)),
    (21, 8, "vegetation", False, (107, 142, 35)),
    (22, 9, "terrain", False, (152, 251, 152)),
    (23, 10, "sky", False, (70, 130, 180)),
    (24, 11, "person", True, (220, 20, 60)),
    (25, 12, "rider", True, (255, 0, 0)),
    (26, 13, "car", True, (0, 0, 142)),
    (27, 14, "truck", True, (0, 0, 70)),
    (28, 15, "bus", True, (0, 60, 100)),
    (31, 16, "train", True, (0, 80, 100)),
    (32, 17, "motorcycle", True, (0, 0, 230)),
    (33, 18, "bicycle", True, (119, 11, 32)),
)
LABEL_TO_TRAIN = {lid: tid for lid, tid, *_ in EVAL_CLASSES}
THING_LABEL_IDS = frozenset(lid for lid, _, _, thing, _ in EVAL_CLASSES if thing)


def manifest_categories(use_train_id: bool = False) -> list[dict]:
    return [
        {
            "class_id": tid,
            "category_id": tid if use_train_id else lid,
            "name": name,
            "isthing": thing,
            "color": list(colour),
        }
        for lid, tid, name, thing, colour in EVAL_CLASSES
    ]


def _stem(instance_png: Path) -> str:
    return instance_png.name[: -len("_gtFine_instanceIds.png")]


def build_raw_index(root: str | Path, split: str, label_divisor: int = DEFAULT_LABEL_DIVISOR) -> Index:
    """One row per ``gtFine/{split}/*/*_instanceIds.png`` (sorted by path: a fixed record order)."""
    root = Path(root)
    gt = root / "gtFine" / split
    pngs = sorted(gt.glob("*/*_gtFine_instanceIds.png"))
    if not pngs:
        raise FileNotFoundError(f"no Cityscapes *_gtFine_instanceIds.png under {gt}")
    rows = []
    for i, p in enumerate(pngs):
        stem, city = _stem(p), p.parent.name
        rows.append(
            {
                "order": i,
                "record_id": stem,
                "file_name": f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
                "label_file": str(p.relative_to(root)),
                "labelids_file": str(p.with_name(f"{stem}_gtFine_labelIds.png").relative_to(root)),
                "height": -1,
                "width": -1,
                "segments_info": "",
            }
        )
    return Index(rows, [], manifest_categories(), label_divisor)


def instance_segments(inst: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """instanceIds map -> (id map with ignored labels set to void 0, createPanopticImgs-like segments)."""
    counts = np.bincount(inst.reshape(-1), minlength=1)
    keep = np.zeros(counts.size, bool)
    segments = []
    for v in np.nonzero(counts)[0].tolist():
        lid = v if v < GROUP_LIMIT else v // GROUP_LIMIT
        if lid not in LABEL_TO_TRAIN:
            continue  # ignoreInEval label (void, caravan, trailer, license plate, ...) -> void
        keep[v] = True
        iscrowd = int(v < GROUP_LIMIT and lid in THING_LABEL_IDS)
        segments.append({"id": v, "category_id": lid, "iscrowd": iscrowd, "area": int(counts[v])})
    return np.where(keep[inst], inst, 0).astype(np.int64), segments


def convert_raw_row(row: dict, ctx: ConvertContext) -> dict:
    root = Path(ctx.root)
    img_rel, inst_rel, lab_rel = row["file_name"], row["label_file"], row["labelids_file"]
    image_bytes = read_bytes(root / img_rel, img_rel)
    inst_img = open_image(read_bytes(root / inst_rel, inst_rel), inst_rel)
    lab_img = open_image(read_bytes(root / lab_rel, lab_rel), lab_rel)
    image = open_image(image_bytes, img_rel)
    hw = (inst_img.height, inst_img.width)
    check_size(lab_rel, "labelIds PNG", (lab_img.height, lab_img.width), hw)
    check_size(img_rel, "image", (image.height, image.width), hw)
    inst = np.asarray(inst_img, dtype=np.int64)
    label_ids = np.asarray(lab_img, dtype=np.int64)
    expected = np.where(inst < GROUP_LIMIT, inst, inst // GROUP_LIMIT)
    bad = expected != label_ids
    if bad.any():
        y, x = (int(a[0]) for a in np.nonzero(bad))
        raise RecordError(
            LABEL_MISMATCH,
            lab_rel,
            f"{int(bad.sum())} pixels disagree with {inst_rel} (first at y={y}, x={x}: "
            f"labelId {int(label_ids[y, x])} vs instanceId {int(inst[y, x])})",
        )
    ids, segments = instance_segments(inst)
    label, segs = build_label(ids, segments, ctx, inst_rel)
    return finish_record(row["record_id"], img_rel, image_bytes, image, label, segs, ctx)


def build_panoptic_index(
    root: str | Path,
    split: str,
    json_path: str | Path | None = None,
    label_divisor: int = DEFAULT_LABEL_DIVISOR,
) -> Index:
    """Rows from createPanopticImgs output: ``gtFine/cityscapes_panoptic_{split}[_trainId].json`` + folder."""
    root = Path(root)
    path = Path(json_path) if json_path else root / "gtFine" / f"cityscapes_panoptic_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"Cityscapes panoptic JSON not found: {path}")
    doc_ids = {int(c["id"]) for c in json.loads(path.read_text())["categories"]}
    use_train_id = path.stem.endswith("_trainId") or doc_ids <= set(range(len(EVAL_CLASSES)))

    def image_path(im: dict, ann: dict) -> Path:
        image_id = str(ann["image_id"])
        return root / "leftImg8bit" / split / image_id.split("_")[0] / f"{image_id}_leftImg8bit.png"

    return panoptic_json_index(
        root, path, path.with_suffix(""), image_path, manifest_categories(use_train_id), label_divisor
    )
