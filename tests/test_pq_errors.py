"""Where the official evaluator crashes or misbehaves, pipeline.eval.pq raises a clear error naming the
image and
segment, or (empty groups) reports n = 0 and None."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.pq import VOID_LABEL, PQInputError, pq_image_stats, reduce_pq_stats
from pipeline.eval.pq_files import pq_compute_files


@pytest.fixture
def edges_copy(pq_oracle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "edges"
    shutil.copytree(pq_oracle_dir / "edges", dst)
    return dst


def _edit_pred(case: Path, edit) -> None:
    data = json.loads((case / "pred.json").read_text())
    edit(data)
    (case / "pred.json").write_text(json.dumps(data))


def _run(case: Path) -> dict:
    return pq_compute_files(case / "gt.json", case / "gt", case / "pred.json", case / "pred", chunks=1)


def test_png_id_without_json_entry(edges_copy: Path) -> None:
    _edit_pred(edges_copy, lambda d: d["annotations"][1]["segments_info"].pop(2))  # id 21 of image 2
    with pytest.raises(
        PQInputError, match=r"image 2 .*img2\.png.*\[21\] are in the label map but not in the"
    ):
        _run(edges_copy)


def test_json_segment_absent_from_png(edges_copy: Path) -> None:
    _edit_pred(
        edges_copy, lambda d: d["annotations"][0]["segments_info"].append({"id": 77, "category_id": 1})
    )
    with pytest.raises(PQInputError, match=r"image 1 .*\[77\] are in the segment list but not in the map"):
        _run(edges_copy)


def test_unknown_category(edges_copy: Path) -> None:
    def edit(d):
        d["annotations"][1]["segments_info"][3]["category_id"] = 4242

    _edit_pred(edges_copy, edit)
    with pytest.raises(PQInputError, match=r"image 2 .*segment id 22 has unknown category_id 4242"):
        _run(edges_copy)


def test_missing_prediction_image(edges_copy: Path) -> None:
    _edit_pred(edges_copy, lambda d: d["annotations"].pop(0))
    with pytest.raises(PQInputError, match=r"no prediction for the image with id 1 \(gt img1\.png\)"):
        _run(edges_copy)


def test_missing_or_single_channel_png(edges_copy: Path) -> None:
    (edges_copy / "pred" / "img2.png").unlink()
    with pytest.raises(PQInputError, match=r"img2\.png does not exist"):
        _run(edges_copy)
    Image.fromarray(np.zeros((64, 128), dtype=np.uint8)).save(edges_copy / "pred" / "img2.png")
    with pytest.raises(PQInputError, match=r"img2\.png must be 8-bit RGB"):
        _run(edges_copy)


def test_duplicate_and_void_prediction_ids() -> None:
    gt = np.zeros((2, 2), dtype=np.int32)
    cats = [{"id": 1, "isthing": 1}]
    gsegs = [{"id": 0, "category_id": 1, "area": 4}]
    with pytest.raises(PQInputError, match="image 'a': prediction segment id 0 is listed twice"):
        pq_image_stats(gt, gsegs, gt, [{"id": 0, "category_id": 1}] * 2, cats, image_id="a")
    with pytest.raises(PQInputError, match=r"prediction segment id -1 equals the void id"):
        pq_image_stats(gt, gsegs, gt, [{"id": VOID_LABEL, "category_id": 1}], cats)
    with pytest.raises(PQInputError, match=r"2-D of one shape"):
        pq_image_stats(gt, gsegs, np.zeros((2, 3), dtype=np.int32), [], cats)


def test_group_without_classes_reports_n_zero() -> None:
    """No stuff class at all (the official tool raises ZeroDivisionError); then nothing at all."""
    gt = np.full((4, 4), VOID_LABEL, dtype=np.int32)
    gt[:2] = 1001
    pred = gt.copy()
    cats = [{"id": 1, "isthing": 1}, {"id": 7, "isthing": 0}]
    segs = [{"id": 1001, "category_id": 1, "iscrowd": 0, "area": 8}]
    s = pq_image_stats(gt, segs, pred, segs, cats)
    r = reduce_pq_stats([s], cats, chunks=1)
    assert r["Stuff"] == {"pq": None, "sq": None, "rq": None, "n": 0}
    assert r["Things"] == r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    # A lone prediction inside void is ignored: no class has TP/FP/FN, every group is empty.
    s = pq_image_stats(np.full((4, 4), VOID_LABEL), [], pred, segs, cats)
    r = reduce_pq_stats([s], cats, chunks=1)
    assert all(r[g]["n"] == 0 and r[g]["pq"] is None for g in ("All", "Things", "Stuff"))
    with pytest.raises(PQInputError, match="share the index 0"):
        reduce_pq_stats([s, s], cats)
