"""Cityscapes readers agree with cityscapesscripts' createPanopticImgs on a synthetic gtFine set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.data import cityscapes
from pipeline.data.panoptic import ConvertContext
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.quarantine import LABEL_MISMATCH, RecordError
from pipeline.data.records import decode_record, iter_records, read_manifest
from pipeline.data.scene import SceneConfig
from pipeline.data.synthetic import generate

pytestmark = pytest.mark.ray
N = 8


@pytest.fixture(scope="module")
def converted(ray_session, tmp_path_factory):
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    base = tmp_path_factory.mktemp("cs")
    root = generate(
        base / "cs",
        "cityscapes",
        train=N,
        val=0,
        seed=2,
        cfg=SceneConfig(height=48, width=96, crowd_prob=0.6, void_prob=0.8),
    )
    for use_train_id in (False, True):  # the oracle; it works unpatched (reference_data_and_pq.md §2.5)
        convert2panoptic(str(root / "gtFine"), str(root / "gtFine"), use_train_id, ["train"])
    outs = {}
    for name, dataset, pj in (
        ("raw", "cityscapes", None),
        ("pan", "cityscapes-panoptic", None),
        ("pan_tid", "cityscapes-panoptic", str(root / "gtFine" / "cityscapes_panoptic_train_trainId.json")),
    ):
        prepare(
            PrepareOptions(dataset, str(root), "train", str(base / name), panoptic_json=pj, progress=False)
        )
        outs[name] = [decode_record(r) for r in iter_records(base / name, "train")]
    return root, base, outs


def test_raw_reader_agrees_with_create_panoptic_imgs(converted):
    root, base, outs = converted
    doc = json.loads((root / "gtFine" / "cityscapes_panoptic_train.json").read_text())
    assert [r["record_id"] for r in outs["raw"]] == [a["image_id"] for a in doc["annotations"]]
    n_crowd = n_caravan = 0
    for rec, ann in zip(outs["raw"], doc["annotations"]):
        ours = sorted((s["source_id"], s["category_id"], s["iscrowd"], s["area"]) for s in rec["segments"])
        theirs = sorted((s["id"], s["category_id"], s["iscrowd"], s["area"]) for s in ann["segments_info"])
        assert ours == theirs
        png = np.asarray(
            Image.open(root / "gtFine" / "cityscapes_panoptic_train" / ann["file_name"]), np.int64
        )
        oracle_ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        assert np.array_equal(oracle_ids == 0, rec["label"] == -1)
        n_crowd += sum(s["iscrowd"] for s in rec["segments"])
        inst = np.asarray(
            Image.open(root / "gtFine" / "train" / "synth" / f"{rec['record_id']}_gtFine_instanceIds.png")
        )
        n_caravan += int((inst // 1000 == 29).sum() > 0)
        for s in rec["segments"]:
            assert s["class_id"] == cityscapes.LABEL_TO_TRAIN[s["category_id"]]
            assert s["isthing"] == (11 <= s["class_id"] <= 18)
            assert s["id"] // 1000 == s["class_id"] and (s["id"] % 1000 >= 1) == s["isthing"]
    assert n_crowd >= 2 and n_caravan >= 1  # group regions -> crowd, caravan instances -> void were exercised
    m = read_manifest(base / "raw", "train")
    assert (
        m["num_classes"] == 19 and m["thing_class_ids"] == list(range(11, 19)) and m["label_divisor"] == 1000
    )


def test_panoptic_json_readers_give_the_same_labels(converted):
    _, _, outs = converted
    for raw, pan, tid in zip(outs["raw"], outs["pan"], outs["pan_tid"]):
        assert raw["record_id"] == pan["record_id"] == tid["record_id"]
        assert np.array_equal(raw["label"], pan["label"]) and np.array_equal(raw["label"], tid["label"])
        assert np.array_equal(raw["image"], pan["image"])
        assert raw["segments"] == pan["segments"]
        assert [s["category_id"] for s in tid["segments"]] == [s["class_id"] for s in raw["segments"]]


def test_class_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels

    evaluated = [
        (lb.id, lb.trainId, lb.name, lb.hasInstances, tuple(lb.color)) for lb in labels if not lb.ignoreInEval
    ]
    assert sorted(evaluated, key=lambda t: t[1]) == list(cityscapes.EVAL_CLASSES)


def test_labelids_disagreeing_with_instanceids_is_rejected(converted, tmp_path):
    root, _, _ = converted
    copy = tmp_path / "cs"
    shutil.copytree(root / "gtFine" / "train", copy / "gtFine" / "train")
    shutil.copytree(root / "leftImg8bit", copy / "leftImg8bit")
    index = cityscapes.build_raw_index(copy, "train")
    lab_path = copy / index.rows[0]["labelids_file"]
    lab = np.asarray(Image.open(lab_path)).copy()
    lab[3, 5] = 21
    Image.fromarray(lab).save(lab_path)
    ctx = ConvertContext(
        str(copy), {c["category_id"]: (c["class_id"], c["isthing"]) for c in index.categories}, 1000
    )
    with pytest.raises(RecordError) as err:
        cityscapes.convert_raw_row(index.rows[0], ctx)
    assert err.value.code == LABEL_MISMATCH and "y=3, x=5" in err.value.message
    assert cityscapes.convert_raw_row(index.rows[1], ctx)["record_id"] == index.rows[1]["record_id"]
