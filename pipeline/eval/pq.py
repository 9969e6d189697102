"""Exact, fast panoptic quality (PQ, SQ, RQ) under the rules of the official COCO panoptic evaluator.

Two stages, so that the expensive part runs anywhere (a Ray task, a training worker) and the cheap part
reproduces the official floats to the last bit:

1. `pq_image_stats` turns one image (ground-truth and predicted label maps plus their segment lists) into an
   `ImagePQStats` of INTEGERS only: for every true positive its category, intersection and union (in the
   official ``(gt_id, pred_id)`` order), and per-category false-positive / false-negative counts.
2. `reduce_pq_stats` sorts those by image index and sums the IoUs exactly in the order of the official tool
   (``np.array_split`` of the image list into ``chunks`` pieces, image by image inside a piece, then piece
   by piece), then averages classes in ground-truth category order.

Rules (panopticapi ``evaluation.py`` @ 7bb4655, re-implemented from shared/docs/reference_data_and_pq.md §3;
no code copied): a pair (g, p) is a candidate when both are listed segments, g is not crowd and both have the
same category; ``union = area_p + area_g(as given in the GT segment list) - I - |p ∩ void|``; TP iff
``I / union > 0.5`` (strict); unmatched non-crowd GT segments are FN; crowd is remembered per category, the
LAST crowd segment of a category in list order winning; an unmatched prediction is ignored when
``(|p ∩ void| + |p ∩ crowd[category]|) / area_p > 0.5``, otherwise it is an FP of its category; ids present
in the GT map but not in its segment list are neither void nor matchable.

Where the official tool crashes or misbehaves this module does better (documented in each error):
malformed inputs raise `PQInputError` naming the image and the segment (an id in the prediction map with no
segment entry, a listed segment absent from the map, an unknown category, duplicate or void segment ids,
mismatched shapes), and a group with no class (e.g. no stuff class at all) reports ``n = 0`` and ``None``
for pq/sq/rq instead of raising ZeroDivisionError. Stricter than the official tool, on purpose: a GT segment
of a category missing from ``categories`` raises (the official tool silently drops it), duplicate segment ids
raise (it keeps the last), and a listed prediction id equal to void raises (it would score the void pixels
as that segment). ``per_class`` sq is the float 0.0 where the official tool returns the int 0 (equal with ==).

Speed (reference §3.6): no PNG, no ``np.unique``; one ``np.bincount`` per image over an int64 key built with
one or two ``np.take`` lookups (`pair_table`), then vectorised matching on the small (GT x pred) table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.records import VOID_LABEL
from pipeline.eval.pq_table import pair_table

PNG_VOID_ID = 0
"""Void in COCO panoptic PNGs (id 0, black)."""

MATCH_IOU = 0.5
"""A pair is a true positive when its IoU is strictly above this; the FP-ignore test uses the same bound."""

GROUPS: tuple[tuple[str, bool | None], ...] = (("All", None), ("Things", True), ("Stuff", False))
"""Result groups and the ``isthing`` value they select (None: every class)."""


class PQInputError(ValueError):
    """Malformed ground truth or prediction; the message names the image and the segment."""


@dataclass(frozen=True)
class Category:
    """One ground-truth category: its dataset id and whether it is a thing class."""

    id: int
    isthing: bool


def normalize_categories(categories: Iterable[Mapping[str, Any] | Category]) -> list[Category]:
    """GT categories in dataset order from COCO ``categories`` dicts (``id``, ``isthing``), manifest dicts
    (``category_id``, ``isthing``) or `Category` objects. Duplicate ids raise."""
    out: list[Category] = []
    seen: set[int] = set()
    for i, c in enumerate(categories):
        if isinstance(c, Category):
            cat = c
        else:
            cid = c.get("id", c.get("category_id"))
            if cid is None or "isthing" not in c:
                raise PQInputError(f"categories[{i}] needs 'id' (or 'category_id') and 'isthing': {dict(c)}")
            cat = Category(int(cid), bool(int(c["isthing"])))
        if cat.id in seen:
            raise PQInputError(f"categories[{i}]: duplicate category id {cat.id}")
        seen.add(cat.id)
        out.append(cat)
    if not out:
        raise PQInputError("categories is empty")
    return out


@dataclass
class ImagePQStats:
    """Integer PQ statistics of one image (small and picklable; reduce many with `reduce_pq_stats`).

    Attributes:
        index: position of the image in the evaluation order (the reduction sorts by it).
        image_id: the dataset's image id (for messages and bookkeeping).
        tp_category: int64 [T] category id of each true positive, in ascending (gt_id, pred_id) order.
        tp_intersection: int64 [T] pixel intersection of each true positive.
        tp_union: int64 [T] union of each true positive (void taken out, GT area as given).
        fp: {category_id: count} of false positives.
        fn: {category_id: count} of false negatives.
    """

    index: int
    image_id: Any
    tp_category: np.ndarray
    tp_intersection: np.ndarray
    tp_union: np.ndarray
    fp: dict[int, int] = field(default_factory=dict)
    fn: dict[int, int] = field(default_factory=dict)


def _segment_table(segments: Sequence[Mapping[str, Any]], what: str, name: str, void_label: int) -> list:
    """Validate a segment list (unique ids, none equal to void) and return its dicts."""
    seen: set[int] = set()
    for s in segments:
        if "id" not in s or "category_id" not in s:
            raise PQInputError(f"{name}: {what} segment {dict(s)} needs 'id' and 'category_id'")
        sid = int(s["id"])
        if sid == void_label:
            raise PQInputError(
                f"{name}: {what} segment id {sid} equals the void id (it would be silently void)"
            )
        if sid in seen:
            raise PQInputError(f"{name}: {what} segment id {sid} is listed twice")
        seen.add(sid)
    return list(segments)


def pq_image_stats(
    gt_map: Any,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_map: Any,
    pred_segments: Sequence[Mapping[str, Any]],
    categories: Iterable[Mapping[str, Any] | Category] | Mapping[int, Category],
    *,
    index: int = 0,
    image_id: Any = None,
    void_label: int = VOID_LABEL,
    name: str | None = None,
) -> ImagePQStats:
    """Integer PQ statistics of one image.

    Args:
        gt_map: int [H, W] ground-truth label map (numpy or CPU torch); ``void_label`` marks void.
        gt_segments: segment dicts with ``id``, ``category_id``, ``iscrowd`` (default 0) and ``area`` (taken
            as given, like the official tool; counted from the map when absent).
        pred_map: int [H, W] predicted label map, same shape.
        pred_segments: segment dicts with ``id`` and ``category_id`` (``iscrowd``/``area`` are ignored; the
            predicted area is counted from the map).
        categories: GT categories (see `normalize_categories`), or a ``{id: Category}`` mapping.
        index: position in the evaluation order; image_id: the dataset id; name: how errors name the image.
        void_label: void value in both maps (``PNG_VOID_ID`` = 0 for COCO PNG ids).

    Raises:
        PQInputError: shapes differ, a predicted id has no segment entry, a listed prediction is absent from
            its map, a category is unknown, or segment ids are duplicated / equal to void.
    """
    name = name or f"image {image_id!r}"
    cats = (
        categories if isinstance(categories, Mapping) else {c.id: c for c in normalize_categories(categories)}
    )
    gt, pred = _check_maps(gt_map, pred_map, name)
    gsegs = _segment_table(gt_segments, "ground-truth", name, void_label)
    psegs = _segment_table(pred_segments, "prediction", name, void_label)
    _check_categories({"ground-truth": gsegs, "prediction": psegs}, cats, name)
    # Both segment lists sorted by id: row-major order of the (gt, pred) table is then the official
    # ascending (gt_id, pred_id) order in which true-positive IoUs are summed.
    g = _SortedSegments(gsegs)
    p = _SortedSegments(psegs)
    table = pair_table(gt, g.ids, pred, p.ids, void_label)
    # rows: GT segments (sorted), GT void, GT unlisted ids; columns: predictions (sorted), pred void, unknown.
    p_area = _check_prediction_ids(table, pred, p.ids, void_label, name)
    n_g, n_p = len(g.ids), len(p.ids)
    g_area = np.array(
        [int(s["area"]) if "area" in s else int(table[k].sum()) for k, s in enumerate(g.segments)],
        dtype=np.int64,
    )
    g_crowd = np.array([int(s.get("iscrowd", 0)) == 1 for s in g.segments], dtype=bool)
    inter, p_void = table[:n_g, :n_p], table[n_g, :n_p]
    candidate = (inter > 0) & (g.categories[:, None] == p.categories[None, :]) & ~g_crowd[:, None]
    union = p_area[None, :] + g_area[:, None] - inter - p_void[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        # Float division and comparison exactly as the official tool (matters only for corrupt GT areas).
        tp = candidate & (inter / np.where(candidate, union, 1) > MATCH_IOU)
    tg, tpp = np.nonzero(tp)  # row-major: ascending (gt_id, pred_id)
    fn = _count_by_category(g.categories[~tp.any(axis=1) & ~g_crowd])
    crowd = _crowd_overlap(table, _last_crowd_rows(gsegs, g.order), p.categories)
    # an unmatched prediction mostly on void or on its class's crowd region is ignored, not a false positive
    fp_mask = ~tp.any(axis=0) & ~((p_void + crowd) / np.maximum(p_area, 1) > MATCH_IOU)
    return ImagePQStats(
        index=int(index),
        image_id=image_id,
        tp_category=g.categories[tg],
        tp_intersection=inter[tg, tpp].astype(np.int64),
        tp_union=union[tg, tpp].astype(np.int64),
        fp=_count_by_category(p.categories[fp_mask]),
        fn=fn,
    )


def _check_maps(gt_map: Any, pred_map: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt_map), np.asarray(pred_map)
    if gt.ndim != 2 or gt.shape != pred.shape:
        raise PQInputError(
            f"{name}: label maps must be 2-D of one shape, got gt {gt.shape} and pred {pred.shape}"
        )
    if not (np.issubdtype(gt.dtype, np.integer) and np.issubdtype(pred.dtype, np.integer)):
        raise PQInputError(f"{name}: label maps must be integer, got gt {gt.dtype} and pred {pred.dtype}")
    return gt, pred


class _SortedSegments:
    """A segment list sorted by id: ``order`` (positions in the given list), ``segments``, ``ids`` and
    ``categories`` (int64 arrays) in that order."""

    def __init__(self, segments: list):
        self.order = sorted(range(len(segments)), key=lambda i: int(segments[i]["id"]))
        self.segments = [segments[i] for i in self.order]
        self.ids = np.array([int(s["id"]) for s in self.segments], dtype=np.int64)
        self.categories = np.array([int(s["category_id"]) for s in self.segments], dtype=np.int64)


def _check_prediction_ids(table: np.ndarray, pred: np.ndarray, p_ids: np.ndarray, void_label: int, name: str):
    """Every predicted id is listed and every listed prediction is in the map; returns the predicted areas."""
    n_p = len(p_ids)
    if table[:, n_p + 1].any():
        listed = np.append(p_ids, void_label)
        unknown = np.setdiff1d(np.unique(pred[~np.isin(pred, listed)]), listed)
        raise PQInputError(
            f"{name}: prediction segment id(s) {unknown.tolist()} are in the label map "
            "but not in the segment list"
        )
    p_area = table[:, :n_p].sum(axis=0)
    if n_p and (p_area == 0).any():
        missing = p_ids[p_area == 0].tolist()
        raise PQInputError(
            f"{name}: prediction segment id(s) {missing} are in the segment list but not in the map"
        )
    return p_area


def _check_categories(segment_lists: dict[str, list], cats: Mapping[int, Category], name: str) -> None:
    for what, segs in segment_lists.items():
        for seg in segs:
            if int(seg["category_id"]) not in cats:
                raise PQInputError(
                    f"{name}: {what} segment id {int(seg['id'])} has unknown category_id {seg['category_id']}"
                )


def _crowd_overlap(table: np.ndarray, crowd_row: dict[int, int], p_categories: np.ndarray) -> np.ndarray:
    """int64 [P]: each prediction's pixels on the crowd region of its own category (0 when none)."""
    return np.array(
        [int(table[crowd_row[int(c)], j]) if int(c) in crowd_row else 0 for j, c in enumerate(p_categories)],
        dtype=np.int64,
    )


def _last_crowd_rows(gsegs: list, g_order: list[int]) -> dict[int, int]:
    """{category: table row of its crowd region}; the official tool keeps one crowd region per category,
    the last in segment-list order."""
    rank = {i: k for k, i in enumerate(g_order)}
    rows: dict[int, int] = {}
    for i, s in enumerate(gsegs):
        if int(s.get("iscrowd", 0)) == 1:
            rows[int(s["category_id"])] = rank[i]
    return rows


def _count_by_category(categories: np.ndarray) -> dict[int, int]:
    """{category: count} in order of first appearance (as the official per-category loop counts)."""
    out: dict[int, int] = {}
    for c in categories.tolist():
        out[int(c)] = out.get(int(c), 0) + 1
    return out


def chunk_bounds(num_images: int, chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of each piece of ``np.array_split(range(num_images), chunks)`` (the official split)."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    base, extra = divmod(num_images, chunks)
    bounds, start = [], 0
    for k in range(chunks):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def default_chunks() -> int:
    """What the official tool would use on this machine: ``multiprocessing.cpu_count()``."""
    return os.cpu_count() or 1


def reduce_pq_stats(
    stats: Iterable[ImagePQStats],
    categories: Iterable[Mapping[str, Any] | Category],
    chunks: int | None = None,
) -> dict[str, Any]:
    """Reduce per-image statistics to the official result dict, bit for bit.

    The images are put in ``index`` order (indices must be unique); per-category IoU sums are accumulated
    image by image inside each of the ``chunks`` pieces of ``np.array_split`` and then piece by piece,
    which is the official summation order when it runs on ``chunks`` processes (None: ``os.cpu_count()``,
    what the official tool would do on this machine). Classes are averaged in the given category order,
    skipping classes with tp + fp + fn == 0 (reported as 0.0 in ``per_class``).

    Returns:
        ``{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {"pq", "sq", "rq"}}}``;
        a group with ``n == 0`` has ``None`` for pq, sq and rq.
    """
    cats = normalize_categories(categories)
    ordered = sorted(stats, key=lambda s: s.index)
    for a, b in zip(ordered, ordered[1:]):
        if a.index == b.index:
            raise PQInputError(
                f"two images share the index {a.index} (image ids {a.image_id!r}, {b.image_id!r})"
            )
    totals = _sum_in_official_order(ordered, chunks or default_chunks())
    unknown = (set(totals.tp) | set(totals.fp) | set(totals.fn)) - {c.id for c in cats}
    if unknown:
        raise PQInputError(f"statistics carry category ids {sorted(unknown)} absent from categories")
    result: dict[str, Any] = {}
    per_class: dict[int, dict[str, float]] = {}
    for group, isthing in GROUPS:
        result[group] = _group_average(
            totals, [c for c in cats if isthing is None or c.isthing == isthing], per_class
        )
    result["per_class"] = per_class
    return result


@dataclass
class _Totals:
    """Per-category sums over the dataset: IoU of true positives, and tp / fp / fn counts."""

    iou: dict[int, float] = field(default_factory=dict)
    tp: dict[int, int] = field(default_factory=dict)
    fp: dict[int, int] = field(default_factory=dict)
    fn: dict[int, int] = field(default_factory=dict)


def _sum_in_official_order(ordered: list[ImagePQStats], chunks: int) -> _Totals:
    """IoUs summed image by image inside each ``np.array_split`` piece, then piece by piece."""
    t = _Totals()
    for start, stop in chunk_bounds(len(ordered), chunks):
        part: dict[int, float] = {}
        for s in ordered[start:stop]:
            for c, i, u in zip(s.tp_category.tolist(), s.tp_intersection.tolist(), s.tp_union.tolist()):
                # int / int is correctly rounded, as numpy int64 / int64 in the official tool.
                part[c] = part.get(c, 0.0) + (i / u if u else math.copysign(math.inf, i))
                t.tp[c] = t.tp.get(c, 0) + 1
            for src, dst in ((s.fp, t.fp), (s.fn, t.fn)):
                for c, v in src.items():
                    dst[c] = dst.get(c, 0) + v
        for c, v in part.items():
            t.iou[c] = t.iou.get(c, 0.0) + v
    return t


def _group_average(t: _Totals, cats: list[Category], per_class: dict) -> dict[str, Any]:
    """The group's mean pq / sq / rq over its classes with tp + fp + fn > 0 (the same float expressions as
    the official pq_average); fills ``per_class`` (0.0 for classes left out)."""
    pq_sum = sq_sum = rq_sum = 0.0
    n = 0
    for c in cats:
        tp, fp, fn = t.tp.get(c.id, 0), t.fp.get(c.id, 0), t.fn.get(c.id, 0)
        if tp + fp + fn == 0:
            per_class[c.id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        s_iou = t.iou.get(c.id, 0.0)
        denom = tp + 0.5 * fp + 0.5 * fn
        pq_c, sq_c, rq_c = s_iou / denom, (s_iou / tp if tp != 0 else 0.0), tp / denom
        per_class[c.id] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
        pq_sum += pq_c
        sq_sum += sq_c
        rq_sum += rq_c
    if n == 0:
        return {"pq": None, "sq": None, "rq": None, "n": 0}
    return {"pq": pq_sum / n, "sq": sq_sum / n, "rq": rq_sum / n, "n": n}


def format_result(result: Mapping[str, Any]) -> str:
    """The official summary table (values x100, one decimal); groups with n = 0 show '-'."""
    lines = [f"{'':10s}| {'PQ':>5s} {'SQ':>5s} {'RQ':>5s} {'N':>4s}", "-" * 34]
    for group, _ in GROUPS:
        r = result[group]
        vals = [("   -" if r[k] is None else f"{100 * r[k]:5.1f}") for k in ("pq", "sq", "rq")]
        lines.append(f"{group:10s}| {vals[0]:>5s} {vals[1]:>5s} {vals[2]:>5s} {r['n']:4d}")
    return "\n".join(lines)
