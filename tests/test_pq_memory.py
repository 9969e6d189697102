"""The in-memory PQ path (label maps + segment lists, no PNG) agrees with the file path and the oracle."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.eval.pq import (
    VOID_LABEL,
    ImagePQStats,
    normalize_categories,
    pq_image_stats,
    reduce_pq_stats,
)
from pipeline.eval.pq_files import load_json, pair_annotations, pq_compute_files, read_id_png

CASES = ("edges", "random_small", "coco_sample")


def _memory_stats(case_dir: Path, as_torch: bool = False) -> tuple[list[ImagePQStats], list]:
    """Per-image stats of decoded maps, void moved from PNG id 0 to VOID_LABEL (the in-memory contract)."""
    gt, pred = load_json(case_dir / "gt.json", "gt"), load_json(case_dir / "pred.json", "pred")
    cats = normalize_categories(gt["categories"])
    stats = []
    for pair in pair_annotations(gt, case_dir / "gt", pred, case_dir / "pred"):
        g, p = read_id_png(pair.gt_png), read_id_png(pair.pred_png)
        g = np.where(g == 0, VOID_LABEL, g)
        p = np.where(p == 0, VOID_LABEL, p)
        if as_torch:
            g, p = torch.from_numpy(g), torch.from_numpy(p)
        stats.append(
            pq_image_stats(
                g, pair.gt_segments, p, pair.pred_segments, cats, index=pair.index, image_id=pair.image_id
            )
        )
    return stats, cats


@pytest.mark.parametrize("case", CASES)
def test_memory_path_equals_file_path_and_oracle(pq_oracle_dir: Path, case: str) -> None:
    d = pq_oracle_dir / case
    stats, cats = _memory_stats(d, as_torch=case == "edges")
    shuffled = stats[:]
    random.Random(0).shuffle(shuffled)  # the reduction orders by index, not by arrival
    with (d / "expected.json").open() as f:
        expected = json.load(f)
    for key, exp in expected.items():
        chunks = int(key.removeprefix("chunks_"))
        mem = reduce_pq_stats(shuffled, cats, chunks=chunks)
        files = pq_compute_files(d / "gt.json", d / "gt", d / "pred.json", d / "pred", chunks=chunks)
        assert mem == files
        assert mem["All"]["pq"] == exp["All"]["pq"] and mem["Things"]["sq"] == exp["Things"]["sq"]


def test_stats_are_small_picklable_integers(pq_oracle_dir: Path) -> None:
    stats, _ = _memory_stats(pq_oracle_dir / "random_small")
    for s in stats:
        for arr in (s.tp_category, s.tp_intersection, s.tp_union):
            assert arr.dtype == np.int64
        assert all(isinstance(v, int) for v in list(s.fp.values()) + list(s.fn.values()))
        back = pickle.loads(pickle.dumps(s))
        assert back.index == s.index and np.array_equal(back.tp_union, s.tp_union) and back.fp == s.fp
    assert sum(len(pickle.dumps(s)) for s in stats) / len(stats) < 2000


def test_ground_truth_against_itself_is_perfect(coco_sample_dir: Path) -> None:
    ann = coco_sample_dir / "annotations"
    gt = json.loads((ann / "panoptic_val2017.json").read_text())
    r = pq_compute_files(gt, ann / "panoptic_val2017", gt, ann / "panoptic_val2017", chunks=2)
    # Classes counted = categories with at least one non-crowd GT segment (crowd-only ones give no TP/FP/FN:
    # the identical crowd prediction is ignored on the same-class crowd region).
    counted = {s["category_id"] for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"]}
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": len(counted)}
    isthing = {c["id"]: c["isthing"] for c in gt["categories"]}
    assert r["Things"]["n"] == sum(isthing[c] for c in counted) > 0
    assert r["Stuff"]["n"] == sum(1 - isthing[c] for c in counted) > 0


def test_hand_computed_void_is_taken_out_of_the_union() -> None:
    """4x8 image: stuff (cat 100) on columns 0-3, a person (cat 1) on columns 4-7 with row 0 void.
    Prediction: stuff on columns 0-2 (IoU 12/16), person on columns 3-7 of every row, i.e. over 4 void pixels:
    union = 20 + 12 - 12 - 4 = 16, IoU 0.75 (0.6 if void stayed in the union)."""
    divisor = 1000
    gt = np.full((4, 8), 100 * divisor, dtype=np.int32)
    gt[:, 4:] = 1 * divisor + 1
    gt[0, 4:] = VOID_LABEL
    pred = np.full((4, 8), 100 * divisor, dtype=np.int32)
    pred[:, 3:] = 1 * divisor + 7
    cats = [{"id": 1, "isthing": 1}, {"id": 100, "isthing": 0}, {"id": 5, "isthing": 0}]
    gsegs = [
        {"id": 100 * divisor, "category_id": 100, "iscrowd": 0, "area": 16},
        {"id": divisor + 1, "category_id": 1, "iscrowd": 0, "area": 12},
    ]
    psegs = [{"id": 100 * divisor, "category_id": 100}, {"id": divisor + 7, "category_id": 1}]
    s = pq_image_stats(gt, gsegs, pred, psegs, cats)
    assert s.tp_category.tolist() == [1, 100]  # ascending (gt_id, pred_id)
    assert s.tp_intersection.tolist() == [12, 12] and s.tp_union.tolist() == [16, 16]
    assert s.fp == {} and s.fn == {}
    r = reduce_pq_stats([s], cats, chunks=1)
    assert r["All"] == {"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 2}
    assert r["per_class"][5] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # no TP/FP/FN: reported 0, not counted


def test_gt_area_is_taken_from_the_segment_list() -> None:
    """Official quirk: the GT area comes from the JSON, so a wrong area changes the IoU (here 12/14)."""
    gt = np.zeros((4, 4), dtype=np.int32) + 3
    pred = np.zeros((4, 4), dtype=np.int32) + 9
    pred[0, :] = 8
    cats = [{"id": 1, "isthing": 1}]
    psegs = [{"id": 9, "category_id": 1}, {"id": 8, "category_id": 1}]
    s = pq_image_stats(gt, [{"id": 3, "category_id": 1, "area": 14}], pred, psegs, cats)
    assert s.tp_union.tolist() == [14] and s.fp == {1: 1}
    s = pq_image_stats(gt, [{"id": 3, "category_id": 1}], pred, psegs, cats)  # no area: counted (16)
    assert s.tp_union.tolist() == [16]


def test_last_crowd_region_of_a_class_wins() -> None:
    """Two crowd regions of one class; the unmatched prediction lies on the first. It is ignored only when
    that region is listed last (reference §3.2)."""
    gt = np.full((4, 8), VOID_LABEL, dtype=np.int32)
    gt[:, :4], gt[:, 4:] = 11, 12
    pred = np.full((4, 8), VOID_LABEL, dtype=np.int32)
    pred[:, :4] = 5
    cats = [{"id": 1, "isthing": 1}]
    a = {"id": 11, "category_id": 1, "iscrowd": 1, "area": 16}
    b = {"id": 12, "category_id": 1, "iscrowd": 1, "area": 16}
    psegs = [{"id": 5, "category_id": 1}]
    assert pq_image_stats(gt, [a, b], pred, psegs, cats).fp == {1: 1}
    assert pq_image_stats(gt, [b, a], pred, psegs, cats).fp == {}


@pytest.mark.parametrize("blocky", [False, True], ids=["per-pixel", "runs"])
@pytest.mark.parametrize("id_scale", [1, 10000, 1 << 20])
def test_pair_table_equals_brute_force_on_every_strategy(id_scale: int, blocky: bool) -> None:
    """Small value ranges use one lookup + raw predicted values, wider ones two lookups, very wide ones a
    binary search; noisy maps are counted per pixel and blocky ones per run of equal pairs; all must count
    the same pairs (unlisted ids fall in the 'other' row / column)."""
    from pipeline.eval.pq_table import MAX_RUN_FRACTION, pair_table, run_starts

    rng = np.random.default_rng(id_scale)
    shape = (10, 5) if blocky else (40, 50)
    gt = rng.integers(0, 6, shape) * id_scale
    pred = rng.integers(0, 7, shape) * id_scale + 3
    gt[rng.random(gt.shape) < 0.1] = VOID_LABEL
    pred[rng.random(pred.shape) < 0.1] = VOID_LABEL
    if blocky:  # 4x10 blocks: runs of 10 along each row, which also continue across row ends
        gt, pred = (np.repeat(np.repeat(m, 4, axis=0), 10, axis=1) for m in (gt, pred))
    runs = run_starts(gt.ravel(), pred.ravel())
    assert (runs is not None) == blocky
    if blocky:
        assert 0 < len(runs) <= MAX_RUN_FRACTION * gt.size and runs[0] == 0
    g_ids = np.array([0, 2, 3, 5]) * id_scale  # 1 and 4 unlisted
    p_ids = np.array([0, 1, 4, 6]) * id_scale + 3  # 2, 3 and 5 unlisted
    table = pair_table(gt, g_ids, pred, p_ids, VOID_LABEL)
    rows = {v: i for i, v in enumerate(g_ids.tolist())} | {VOID_LABEL: len(g_ids)}
    cols = {v: i for i, v in enumerate(p_ids.tolist())} | {VOID_LABEL: len(p_ids)}
    brute = np.zeros_like(table)
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        brute[rows.get(g, len(g_ids) + 1), cols.get(p, len(p_ids) + 1)] += 1
    assert np.array_equal(table, brute)
