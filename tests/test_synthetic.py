"""`kmax synth`: deterministic, consistent COCO / Cityscapes layouts with every feature the tests need."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main as kmax_main
from pipeline.data.panoptic import rgb2id
from pipeline.data.scene import SceneConfig
from pipeline.data.synthetic import generate


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "coco", "coco", train=24, val=6, seed=3)


def test_same_seed_same_bytes_other_seed_differs(tmp_path, coco_root):
    again = generate(tmp_path / "again", "coco", train=24, val=6, seed=3)
    assert _files(again) == _files(coco_root)
    other = generate(tmp_path / "other", "coco", train=24, val=6, seed=4)
    assert _files(other).keys() == _files(coco_root).keys() and _files(other) != _files(coco_root)


def test_coco_layout_is_consistent_and_rich(coco_root):
    doc = json.loads((coco_root / "annotations" / "panoptic_train2017.json").read_text())
    cats = {c["id"]: c for c in doc["categories"]}
    assert sum(c["isthing"] for c in cats.values()) == 3 and len(cats) == 6
    images = {im["id"]: im for im in doc["images"]}
    assert len(doc["annotations"]) == 24 and len(images) == 24
    n_crowd = n_void = 0
    for ann in doc["annotations"]:
        im = images[ann["image_id"]]
        rgb = np.asarray(Image.open(coco_root / "annotations" / "panoptic_train2017" / ann["file_name"]))
        photo = Image.open(coco_root / "train2017" / im["file_name"])
        assert rgb.shape == (96, 96, 3) and photo.size == (96, 96)
        ids = rgb2id(rgb)
        uniq, counts = np.unique(ids, return_counts=True)
        area = dict(zip(uniq.tolist(), counts.tolist()))
        segs = {s["id"]: s for s in ann["segments_info"]}
        assert set(area) - {0} == set(segs)  # every PNG id has a segment and vice versa
        for s in ann["segments_info"]:
            assert s["area"] == area[s["id"]] and s["category_id"] in cats
            assert not (s["iscrowd"] and not cats[s["category_id"]]["isthing"])
        stuff = {s["category_id"] for s in segs.values() if not cats[s["category_id"]]["isthing"]}
        things = [s for s in segs.values() if cats[s["category_id"]]["isthing"] and not s["iscrowd"]]
        assert len(stuff) >= 2 and len(things) >= 1
        n_crowd += any(s["iscrowd"] for s in segs.values())
        n_void += 0 in area
    assert 2 <= n_crowd <= 16 and 2 <= n_void <= 16  # a small amount of crowd and void


def test_cityscapes_layout_encoding(tmp_path):
    root = generate(
        tmp_path / "cs", "cityscapes", train=6, val=0, seed=1, cfg=SceneConfig(height=32, width=64)
    )
    pngs = sorted((root / "gtFine" / "train" / "synth").glob("*_instanceIds.png"))
    assert len(pngs) == 6 and not (root / "gtFine" / "val").exists()
    values = set()
    for p in pngs:
        im = Image.open(p)
        assert im.mode == "I;16"
        inst = np.asarray(im, dtype=np.int64)
        lab = np.asarray(Image.open(str(p).replace("instanceIds", "labelIds")), dtype=np.int64)
        assert np.array_equal(np.where(inst < 1000, inst, inst // 1000), lab)
        left = root / "leftImg8bit" / "train" / "synth" / p.name.replace("gtFine_instanceIds", "leftImg8bit")
        assert Image.open(left).size == (64, 32)
        values |= set(np.unique(inst).tolist())
    # stuff label ids bare, thing instances labelId*1000 + k counted from 0
    assert {7, 11, 23} & values and any(v // 1000 in (24, 26, 33) and v % 1000 == 0 for v in values)


def test_cli_and_validation(tmp_path, capsys):
    rc = kmax_main(
        [
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--train",
            "2",
            "--val",
            "1",
            "--height",
            "40",
            "--width",
            "48",
            "--seed",
            "9",
        ]
    )
    assert rc == 0
    assert len(list((tmp_path / "d" / "train2017").glob("*.jpg"))) == 2
    assert Image.open(next((tmp_path / "d" / "val2017").glob("*.jpg"))).size == (48, 40)
    assert kmax_main(["synth", "--out", str(tmp_path / "e"), "--height", "4"]) == 2
    assert "synth.height/width" in capsys.readouterr().err
    with pytest.raises(ValueError, match="synth.crowd_prob"):
        SceneConfig(crowd_prob=2.0)
