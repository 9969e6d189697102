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

from pipeline.eval.pq_table import pair_table

VOID_LABEL = -1
"""Void in in-memory label maps; mirrors ``kmax_model.targets.VOID_LABEL`` (not imported: it pulls torch)."""

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
    gt = np.asarray(gt_map)
    pred = np.asarray(pred_map)
    if gt.ndim != 2 or gt.shape != pred.shape:
        raise PQInputError(
            f"{name}: label maps must be 2-D of one shape, got gt {gt.shape} and pred {pred.shape}"
        )
    if not (np.issubdtype(gt.dtype, np.integer) and np.issubdtype(pred.dtype, np.integer)):
        raise PQInputError(f"{name}: label maps must be integer, got gt {gt.dtype} and pred {pred.dtype}")
    gsegs = _segment_table(gt_segments, "ground-truth", name, void_label)
    psegs = _segment_table(pred_segments, "prediction", name, void_label)
    for what, segs in (("ground-truth", gsegs), ("prediction", psegs)):
        for s in segs:
            if int(s["category_id"]) not in cats:
                raise PQInputError(
                    f"{name}: {what} segment id {int(s['id'])} has unknown category_id {s['category_id']}"
                )

    # Sort both segment lists by id so that row-major order of the (gt, pred) table is the official
    # ascending (gt_id, pred_id) order in which true-positive IoUs are summed.
    g_order = sorted(range(len(gsegs)), key=lambda i: int(gsegs[i]["id"]))
    p_order = sorted(range(len(psegs)), key=lambda i: int(psegs[i]["id"]))
    g_ids = np.array([int(gsegs[i]["id"]) for i in g_order], dtype=np.int64)
    p_ids = np.array([int(psegs[i]["id"]) for i in p_order], dtype=np.int64)
    n_g, n_p = len(g_ids), len(p_ids)
    table = pair_table(gt, g_ids, pred, p_ids, void_label)
    # rows: GT segments (sorted), GT void, GT unlisted ids; columns: predictions (sorted), pred void, unknown.

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

    g_cat = np.array([int(gsegs[i]["category_id"]) for i in g_order], dtype=np.int64)
    g_crowd = np.array([int(gsegs[i].get("iscrowd", 0)) == 1 for i in g_order], dtype=bool)
    g_area = np.array(
        [int(gsegs[i]["area"]) if "area" in gsegs[i] else int(table[k].sum()) for k, i in enumerate(g_order)],
        dtype=np.int64,
    )
    p_cat = np.array([int(psegs[i]["category_id"]) for i in p_order], dtype=np.int64)
    inter = table[:n_g, :n_p]
    p_void = table[n_g, :n_p]

    candidate = (inter > 0) & (g_cat[:, None] == p_cat[None, :]) & ~g_crowd[:, None]
    union = p_area[None, :] + g_area[:, None] - inter - p_void[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        # Float division and comparison exactly as the official tool (matters only for corrupt GT areas).
        tp = candidate & (inter / np.where(candidate, union, 1) > MATCH_IOU)
    tg, tpp = np.nonzero(tp)  # row-major: ascending (gt_id, pred_id)
    g_matched = tp.any(axis=1)
    p_matched = tp.any(axis=0)

    fn: dict[int, int] = {}
    for k in np.nonzero(~g_matched & ~g_crowd)[0].tolist():
        c = int(g_cat[k])
        fn[c] = fn.get(c, 0) + 1
    # The official tool keeps one crowd region per category: the last in segment-list order.
    rank = {i: k for k, i in enumerate(g_order)}
    crowd_row: dict[int, int] = {}
    for i, s in enumerate(gsegs):
        if int(s.get("iscrowd", 0)) == 1:
            crowd_row[int(s["category_id"])] = rank[i]
    fp: dict[int, int] = {}
    for j in np.nonzero(~p_matched)[0].tolist():
        c = int(p_cat[j])
        ignored = int(p_void[j]) + (int(table[crowd_row[c], j]) if c in crowd_row else 0)
        if ignored / int(p_area[j]) > MATCH_IOU:
            continue
        fp[c] = fp.get(c, 0) + 1
    return ImagePQStats(
        index=int(index),
        image_id=image_id,
        tp_category=g_cat[tg],
        tp_intersection=inter[tg, tpp].astype(np.int64),
        tp_union=union[tg, tpp].astype(np.int64),
        fp=fp,
        fn=fn,
    )


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
    known = {c.id for c in cats}
    iou: dict[int, float] = {}
    tp: dict[int, int] = {}
    fp: dict[int, int] = {}
    fn: dict[int, int] = {}
    for start, stop in chunk_bounds(len(ordered), chunks or default_chunks()):
        part: dict[int, float] = {}
        for s in ordered[start:stop]:
            for c, i, u in zip(s.tp_category.tolist(), s.tp_intersection.tolist(), s.tp_union.tolist()):
                # int / int is correctly rounded, as numpy int64 / int64 in the official tool.
                part[c] = part.get(c, 0.0) + (i / u if u else math.copysign(math.inf, i))
                tp[c] = tp.get(c, 0) + 1
            for src, dst in ((s.fp, fp), (s.fn, fn)):
                for c, v in src.items():
                    dst[c] = dst.get(c, 0) + v
        for c, v in part.items():
            iou[c] = iou.get(c, 0.0) + v
    unknown = (set(tp) | set(fp) | set(fn)) - known
    if unknown:
        raise PQInputError(f"statistics carry category ids {sorted(unknown)} absent from categories")

    result: dict[str, Any] = {}
    per_class: dict[int, dict[str, float]] = {}
    for group, isthing in GROUPS:
        pq_sum = sq_sum = rq_sum = 0.0
        n = 0
        for c in cats:
            if isthing is not None and c.isthing != isthing:
                continue
            t, f_p, f_n = tp.get(c.id, 0), fp.get(c.id, 0), fn.get(c.id, 0)
            if t + f_p + f_n == 0:
                per_class[c.id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            s_iou = iou.get(c.id, 0.0)
            # Same float expressions as the official pq_average.
            denom = t + 0.5 * f_p + 0.5 * f_n
            pq_c, sq_c, rq_c = s_iou / denom, (s_iou / t if t != 0 else 0.0), t / denom
            per_class[c.id] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
            pq_sum += pq_c
            sq_sum += sq_c
            rq_sum += rq_c
        if n == 0:
            result[group] = {"pq": None, "sq": None, "rq": None, "n": 0}
        else:
            result[group] = {"pq": pq_sum / n, "sq": sq_sum / n, "rq": rq_sum / n, "n": n}
    result["per_class"] = per_class
    return result


def pq_compute_files(
    gt_json: Any, gt_folder: Any, pred_json: Any, pred_folder: Any, chunks: int | None = None
):
    """PQ of COCO panoptic files (JSON + PNG folders); see `pipeline.eval.pq_files.pq_compute_files`."""
    from pipeline.eval.pq_files import pq_compute_files as _files

    return _files(gt_json, gt_folder, pred_json, pred_folder, chunks=chunks)


def format_result(result: Mapping[str, Any]) -> str:
    """The official summary table (values x100, one decimal); groups with n = 0 show '-'."""
    lines = [f"{'':10s}| {'PQ':>5s} {'SQ':>5s} {'RQ':>5s} {'N':>4s}", "-" * 34]
    for group, _ in GROUPS:
        r = result[group]
        vals = [("   -" if r[k] is None else f"{100 * r[k]:5.1f}") for k in ("pq", "sq", "rq")]
        lines.append(f"{group:10s}| {vals[0]:>5s} {vals[1]:>5s} {vals[2]:>5s} {r['n']:4d}")
    return "\n".join(lines)
