"""The real COCO panoptic sample through `kmax prepare`: areas, crowd, void, 133 categories, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kmax_model.targets import VOID_LABEL
from pipeline.cli import main as kmax_main
from pipeline.data import coco
from pipeline.data.panoptic import ConvertContext, rgb2id
from pipeline.data.records import decode_record, iter_records, read_manifest
from tests.shard_helpers import source_id_map

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def prepared(coco_sample_dir, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco_prep")
    args = [
        "prepare",
        "--dataset",
        "coco",
        "--root",
        str(coco_sample_dir),
        "--split",
        "val",
        "--out",
        str(out),
    ]
    assert kmax_main(args + ["--quiet"]) == 0
    return out


def _gt(coco_sample_dir):
    doc = json.loads((coco_sample_dir / "annotations" / "panoptic_val2017.json").read_text())
    anns = {str(a["image_id"]): a for a in doc["annotations"]}
    return doc, anns


def _ids(coco_sample_dir, ann):
    png = coco_sample_dir / "annotations" / "panoptic_val2017" / ann["file_name"]
    return rgb2id(np.asarray(Image.open(png).convert("RGB")))


def test_areas_crowd_void_and_round_trip(prepared, coco_sample_dir):
    doc, anns = _gt(coco_sample_dir)
    cats = {c["id"]: c for c in doc["categories"]}
    recs = [decode_record(r) for r in iter_records(prepared, "val")]
    assert [r["record_id"] for r in recs] == [str(a["image_id"]) for a in doc["annotations"]]
    divisor = read_manifest(prepared, "val")["label_divisor"]
    assert divisor == 256
    n_crowd = 0
    for rec in recs:
        ann = anns[rec["record_id"]]
        ids = _ids(coco_sample_dir, ann)
        json_area = {s["id"]: s for s in ann["segments_info"]}
        assert len(rec["segments"]) == len(ann["segments_info"])
        per_class_instances: dict[int, list[int]] = {}
        for seg in rec["segments"]:
            src = json_area[seg["source_id"]]
            assert int((rec["label"] == seg["id"]).sum()) == src["area"] == seg["area"]
            assert seg["category_id"] == src["category_id"] and seg["iscrowd"] == src["iscrowd"]
            assert seg["isthing"] == bool(cats[src["category_id"]]["isthing"])
            assert seg["id"] // divisor == seg["class_id"]
            inst = seg["id"] % divisor
            if seg["isthing"]:  # crowd regions are thing instances >= 1, flagged iscrowd
                per_class_instances.setdefault(seg["class_id"], []).append(inst)
            else:
                assert inst == 0
            n_crowd += seg["iscrowd"]
        for insts in per_class_instances.values():
            assert insts == list(range(1, len(insts) + 1))
        assert np.array_equal(rec["label"] == VOID_LABEL, ids == 0)
        assert np.array_equal(source_id_map(rec["label"], rec["segments"]), ids)  # back to the COCO id PNG
        jpg = np.asarray(
            Image.open(coco_sample_dir / "val2017" / rec["file_name"].split("/")[-1]).convert("RGB")
        )
        assert np.array_equal(rec["image"], jpg)
    assert n_crowd == 3  # a person crowd in each image and a category-19 crowd


def test_133_categories_map_as_documented(prepared):
    m = read_manifest(prepared, "val")
    cats = m["categories"]
    assert m["num_classes"] == 133 and [c["class_id"] for c in cats] == list(range(133))
    assert [c["isthing"] for c in cats] == [True] * 80 + [False] * 53
    assert m["thing_class_ids"] == list(range(80))
    by_id = {c["category_id"]: c["class_id"] for c in cats}
    assert by_id[1] == 0 and by_id[90] == 79 and by_id[92] == 80 and by_id[200] == 132
    assert 12 not in by_id and by_id[184] == cats[by_id[184]]["class_id"]
    assert cats[by_id[187]]["name"] == "sky-other-merged"
    assert m["num_records"] == 2 and m["num_quarantined"] == 0 and m["options"]["dataset"] == "coco"


def test_max_size_resizes_labels_with_nearest(coco_sample_dir, ray_session, tmp_path):
    args = [
        "prepare",
        "--root",
        str(coco_sample_dir),
        "--split",
        "val",
        "--out",
        str(tmp_path),
        "--max-size",
        "160",
    ]
    assert kmax_main(args + ["--quiet"]) == 0
    recs = [decode_record(r) for r in iter_records(tmp_path, "val")]
    assert [(r["height"], r["width"]) for r in recs] == [(107, 160), (90, 160)]
    assert [(r["orig_height"], r["orig_width"]) for r in recs] == [(427, 640), (360, 640)]
    for rec in recs:
        assert rec["image"].shape == (rec["height"], rec["width"], 3)
        allowed = {s["id"] for s in rec["segments"]} | {VOID_LABEL}
        assert set(np.unique(rec["label"]).tolist()) <= allowed  # nearest: no blended ids
        for seg in rec["segments"]:
            assert int((rec["label"] == seg["id"]).sum()) == seg["area"] > 0


def test_convert_row_without_ray(coco_sample_dir):
    index = coco.build_index(coco_sample_dir, "val")
    ctx = ConvertContext(str(coco_sample_dir), coco.category_lookup(index.categories), 256)
    rec = coco.convert_png_row(index.rows[0], ctx)
    assert rec["record_id"] == "142238" and (rec["height"], rec["width"]) == (427, 640)
    assert (
        rec["image"] == (coco_sample_dir / "val2017" / "000000142238.jpg").read_bytes()
    )  # source bytes kept
