"""Every fault of the issue is quarantined with its reason, and the good records are written exactly as in a
clean run (same shard bytes)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.data import quarantine as v
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.records import read_manifest
from pipeline.data.scene import SceneConfig
from pipeline.data.synthetic import generate

pytestmark = pytest.mark.ray
N_TRAIN = 16


def _inject(root, doc):
    """Apply one fault per annotation (by position); returns {record_id: expected code}."""
    anns, ims = doc["annotations"], {im["id"]: im for im in doc["images"]}
    png_dir, img_dir = root / "annotations" / "panoptic_train2017", root / "train2017"

    def stuff(a):
        return next(s for s in a["segments_info"] if s["category_id"] >= 10)

    def img(a):
        return img_dir / ims[a["image_id"]]["file_name"]

    def truncate(p):
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])

    faults = [
        (v.MISSING_FILE, lambda a: img(a).unlink()),
        (v.UNREADABLE_FILE, lambda a: img(a).write_bytes(b"this is not a jpeg")),
        (v.TRUNCATED_FILE, lambda a: truncate(img(a))),
        (v.MISSING_FILE, lambda a: (png_dir / a["file_name"]).unlink()),
        (v.TRUNCATED_FILE, lambda a: truncate(png_dir / a["file_name"])),
        (v.SIZE_MISMATCH, lambda a: ims[a["image_id"]].update(height=ims[a["image_id"]]["height"] + 1)),
        (v.PNG_ID_WITHOUT_SEGMENT, lambda a: a["segments_info"].remove(stuff(a))),
        (
            v.SEGMENT_NOT_IN_PNG,
            lambda a: a["segments_info"].append(
                {"id": 4242, "category_id": 1, "iscrowd": 0, "area": 5, "bbox": [0, 0, 1, 1]}
            ),
        ),
        (v.AREA_MISMATCH, lambda a: stuff(a).update(area=stuff(a)["area"] + 1)),
        (v.UNKNOWN_CATEGORY, lambda a: stuff(a).update(category_id=77)),
        (v.CROWD_STUFF, lambda a: stuff(a).update(iscrowd=1)),
    ]
    expected = {}
    for k, (code, fault) in enumerate(faults):
        a = anns[1 + k]  # record 0 stays good; the duplicate below copies it
        fault(a)
        expected[str(a["image_id"])] = code
    anns.append(json.loads(json.dumps(anns[0])))  # a duplicate image id (the later entry is rejected)
    return expected


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    base = tmp_path_factory.mktemp("quarantine")
    clean_src = generate(
        base / "src", "coco", train=N_TRAIN, val=0, seed=5, cfg=SceneConfig(height=48, width=48)
    )
    faulty = base / "faulty"
    shutil.copytree(clean_src, faulty)
    jpath = faulty / "annotations" / "panoptic_train2017.json"
    doc = json.loads(jpath.read_text())
    expected = _inject(faulty, doc)
    jpath.write_text(json.dumps(doc))
    # the clean reference: the same dataset without the faulty records
    clean = json.loads((clean_src / "annotations" / "panoptic_train2017.json").read_text())
    clean["annotations"] = [a for a in clean["annotations"] if str(a["image_id"]) not in expected]
    (clean_src / "annotations" / "panoptic_train2017.json").write_text(json.dumps(clean))
    out_f, out_c = base / "out_faulty", base / "out_clean"
    m_f = prepare(PrepareOptions("coco", str(faulty), "train", str(out_f), progress=False, shard_mb=0.01))
    m_c = prepare(PrepareOptions("coco", str(clean_src), "train", str(out_c), progress=False, shard_mb=0.01))
    return expected, out_f, out_c, m_f, m_c, faulty


def test_each_fault_has_its_reason(runs):
    expected, out_f, *_ = runs
    lines = [json.loads(x) for x in (out_f / "train" / "quarantine.jsonl").read_text().splitlines()]
    got = {q["record_id"]: q["code"] for q in lines if q["code"] != v.DUPLICATE_IMAGE_ID}
    assert got == expected
    dup = [q for q in lines if q["code"] == v.DUPLICATE_IMAGE_ID]
    assert len(dup) == 1 and dup[0]["record_id"] == "1" and "annotation #0" in dup[0]["reason"]
    by_code = {q["code"]: q for q in lines}
    assert "4242" in by_code[v.SEGMENT_NOT_IN_PNG]["reason"]
    assert "unknown category_id 77" in by_code[v.UNKNOWN_CATEGORY]["reason"]
    assert "49x48" in by_code[v.SIZE_MISMATCH]["reason"] and by_code[v.SIZE_MISMATCH]["file"].endswith(".png")
    assert all(q["file"] for q in lines)


def test_good_records_identical_to_clean_run(runs):
    expected, out_f, out_c, m_f, m_c, _ = runs
    assert m_f["num_records"] == m_c["num_records"] == N_TRAIN - len(expected)
    assert m_f["num_quarantined"] == len(expected) + 1 and m_c["num_quarantined"] == 0
    assert len(m_f["shards"]) > 1
    assert [s["sha256"] for s in m_f["shards"]] == [s["sha256"] for s in m_c["shards"]]


def test_strict_writes_nothing_and_keeps_earlier_output(runs, capsys):
    from pipeline.cli import main as kmax_main

    expected, out_f, _, m_f, _, faulty = runs
    before = (out_f / "train" / "manifest.json").read_bytes()
    rc = kmax_main(
        ["prepare", "--root", str(faulty), "--split", "train", "--out", str(out_f), "--strict", "--quiet"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and f"{len(expected) + 1} record(s) quarantined" in err and "area_mismatch=1" in err
    assert (out_f / "train" / "manifest.json").read_bytes() == before
    assert read_manifest(out_f, "train")["num_records"] == m_f["num_records"]
    assert sorted(p.name for p in out_f.iterdir()) == ["train"]  # no temporary folder left behind


def test_validation_helpers_directly():
    cats = {1: (0, True), 10: (1, False)}
    with pytest.raises(v.RecordError) as e:
        v.check_segments_info("x.png", [{"id": 3, "category_id": 10}, {"id": 4, "category_id": 10}], cats)
    assert e.value.code == v.REPEATED_STUFF
    with pytest.raises(v.RecordError) as e:
        v.check_segments_info("x.png", [{"id": 3, "category_id": 1}, {"id": 3, "category_id": 1}], cats)
    assert e.value.code == v.DUPLICATE_SEGMENT_ID
    arr = np.zeros((4, 4, 3), np.uint8)
    im = Image.fromarray(arr)
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert v.open_image(buf.getvalue(), "ok.png").size == (4, 4)


def test_malformed_annotation_is_quarantined_not_fatal(tmp_path):
    from pipeline.data.coco import build_index, category_lookup
    from pipeline.data.panoptic import ConvertContext
    from pipeline.data.prepare import convert_one

    root = generate(tmp_path / "m", "coco", train=1, val=0, seed=1, cfg=SceneConfig(height=32, width=32))
    index = build_index(root, "train")
    row = dict(index.rows[0], segments_info=json.dumps([{"category_id": 1, "area": 3}]))  # no "id"
    out = convert_one(row, ConvertContext(str(root), category_lookup(index.categories), 256))
    assert not out["ok"] and out["code"] == v.MALFORMED_ANNOTATION and "KeyError" in out["reason"]
    assert out["file"].endswith(".png")
