"""mIoU and mask AP on hand-made cases with known answers; AP cross-checked against pycocotools run on the
same predictions written as COCO files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.eval.metrics import (
    COCO_AP_NAMES,
    ImageInstances,
    coco_segm_inputs,
    confusion_matrix,
    encode_mask,
    mask_ap,
    miou_from_confusion,
)


def test_miou_hand_computed() -> None:
    """Class 0: TP 2, FN 1 -> 2/3. Class 1: TP 1, FN 1 (void prediction), FP 1 -> 1/3. Class 2: 1.
    Class 3 appears nowhere -> None, left out. The pixel with GT 255 predicted 0 is free."""
    gt = np.array([[0, 0, 0, 1], [1, 255, 2, 2]])
    pred = np.array([[0, 0, 1, 1], [255, 0, 2, 2]])
    cm = confusion_matrix(gt, pred, num_classes=4)
    assert cm.shape == (4, 5) and cm.sum() == 7
    r = miou_from_confusion(cm)
    assert r["per_class"] == {0: pytest.approx(2 / 3), 1: pytest.approx(1 / 3), 2: 1.0, 3: None}
    assert r["miou"] == pytest.approx(2 / 3)
    # Summing matrices of two images equals the matrix of the two images side by side.
    both = confusion_matrix(np.concatenate([gt, gt[::-1]], 1), np.concatenate([pred, pred[::-1]], 1), 4)
    assert np.array_equal(both, cm + confusion_matrix(gt[::-1], pred[::-1], 4))


def test_miou_nothing_to_score() -> None:
    r = miou_from_confusion(confusion_matrix(np.full((2, 2), 255), np.zeros((2, 2)), 3))
    assert r["miou"] is None
    with pytest.raises(ValueError, match=r"\[K, K\+1\]"):
        miou_from_confusion(np.zeros((3, 3)))


def _square(y0: int, x0: int, h: int, w: int, size: int = 32) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return m


CATS = [{"id": 1}, {"id": 3}]


def test_mask_ap_perfect_and_known_iou() -> None:
    gt = [{"category_id": 1, "rle": encode_mask(_square(0, 0, 10, 10)), "iscrowd": 0}]
    perfect = ImageInstances(1, 32, 32, gt=gt, pred=[{"category_id": 1, "rle": gt[0]["rle"], "score": 0.9}])
    assert mask_ap([perfect], CATS)["AP"] == pytest.approx(1.0)
    # A 8x9 prediction inside the 10x10 GT: IoU 0.72, a match at thresholds 0.50 ... 0.70 (5 of 10).
    partial = ImageInstances(
        1, 32, 32, gt=gt, pred=[{"category_id": 1, "rle": encode_mask(_square(0, 0, 8, 9)), "score": 0.9}]
    )
    r = mask_ap([partial], CATS)
    assert (
        r["AP"] == pytest.approx(0.5) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(0.0)
    )
    assert mask_ap([ImageInstances(1, 32, 32, gt=gt)], CATS)["AP"] == 0.0
    assert mask_ap([ImageInstances(1, 32, 32)], CATS)["AP"] is None


def _random_images(seed: int = 0) -> list[ImageInstances]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(4):
        img = ImageInstances(i + 1, 32, 32)
        for _ in range(3):
            y, x, h, w = rng.integers(0, 16, 2).tolist() + rng.integers(4, 16, 2).tolist()
            cat = int(rng.choice([1, 3]))
            crowd = int(rng.random() < 0.2)
            img.gt.append({"category_id": cat, "rle": encode_mask(_square(y, x, h, w)), "iscrowd": crowd})
            dy, dx = rng.integers(-3, 4, 2).tolist()
            img.pred.append(
                {
                    "category_id": cat if rng.random() < 0.8 else 4 - cat,
                    "rle": encode_mask(_square(max(y + dy, 0), max(x + dx, 0), h, w)),
                    "score": float(rng.random()),
                }
            )
        images.append(img)
    return images


def test_mask_ap_equals_pycocotools_on_written_files(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = _random_images()
    gt_dict, results = coco_segm_inputs(images, CATS)
    (tmp_path / "gt.json").write_text(json.dumps(gt_dict))
    (tmp_path / "res.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "res.json")), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = mask_ap(images, CATS)
    assert 0.0 < ours["AP"] < 1.0
    for name, ref in zip(COCO_AP_NAMES, ev.stats):
        assert ours[name] == (float(ref) if ref >= 0 else None), name


def test_miou_equals_cityscapes_official_script(tmp_path: Path, monkeypatch) -> None:
    """Our confusion-matrix mIoU against cityscapesScripts evalPixelLevelSemanticLabeling (its pure-Python
    path) on random train-id maps written as label-id PNGs; train id 255 is written as label id 0."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    from cityscapesscripts.helpers.labels import trainId2label
    from PIL import Image

    rng = np.random.default_rng(3)
    to_label_id = np.zeros(256, dtype=np.uint8)
    for train_id in range(19):
        to_label_id[train_id] = trainId2label[train_id].id
    gts, preds, total = [], [], np.zeros((19, 20), dtype=np.int64)
    for i in range(3):
        gt = rng.integers(0, 19, (24, 40))
        gt[rng.random(gt.shape) < 0.15] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 19, gt.shape))
        pred[rng.random(gt.shape) < 0.05] = 255
        pred[gt == 7] = 8  # class 7 never right: IoU 0
        total += confusion_matrix(gt, pred, num_classes=19)
        for arr, lst, name in ((gt, gts, "gt"), (pred, preds, "pred")):
            path = tmp_path / f"{i}_{name}_labelIds.png"
            Image.fromarray(to_label_id[np.where(arr == 255, 255, arr)]).save(path)
            lst.append(str(path))
    for key, value in (("evalInstLevelScore", False), ("JSONOutput", False), ("quiet", True)):
        monkeypatch.setattr(official.args, key, value)  # module-global args of the official script
    ref = official.evaluateImgLists(preds, gts, official.args)
    ours = miou_from_confusion(total)
    for train_id in range(19):
        assert ours["per_class"][train_id] == ref["classScores"][trainId2label[train_id].name]
    assert ours["per_class"][7] == 0.0
    assert ours["miou"] == pytest.approx(ref["averageScoreClasses"], rel=1e-12)
