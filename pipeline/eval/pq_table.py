"""Pixel counting for PQ: the (GT segment, predicted segment) intersection table of one image.

Split from `pipeline.eval.pq` (which re-exports both functions). No ``np.unique(return_inverse=True)`` and
no PNG
(shared/docs/reference_data_and_pq.md §3.6). Panoptic label maps are piecewise constant, so the maps are first
cut into runs of equal (GT, prediction) pairs in row-major order (two vectorised comparisons); only the run
starts are then compacted with one ``np.take`` through a lookup table (or a binary search over the few listed
ids when the value range is huge) and counted by one ``np.bincount`` weighted by the run lengths. Maps with
too many runs (noise) are counted pixel by pixel instead.
"""

from __future__ import annotations

import math
import threading

import numpy as np

LUT_MAX_FACTOR = 4
"""Label maps whose value range is at most this many times their pixel count are compacted with a lookup
table (one gather); wider ranges (e.g. COCO colour ids up to 2^24 on a small image) use a binary search."""

LUT_MIN_SIZE = 1 << 16
"""A lookup table of this many entries is always cheap enough, whatever the image size."""

MAX_RUN_FRACTION = 0.25
"""Count runs instead of pixels when there are at most this many runs per pixel (real and synthetic panoptic
maps have a few per cent; beyond a quarter the run bookkeeping costs more than it saves)."""

WIDE_TABLE_MAX_FACTOR = 1.0
"""`pair_table` counts (GT index, raw predicted value) pairs directly when that table has at most this many
entries per pixel; otherwise it compacts the predicted ids as well (a wide table costs more than a lookup)."""


def compact_ids(
    label_map: np.ndarray,
    ids: np.ndarray,
    void_label: int,
    scale: int = 1,
    shift: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Map every pixel to ``scale`` times a compact index plus ``shift``: index ``k`` for ``ids[k]``,
    ``len(ids)`` for void, ``len(ids) + 1`` for any other value. ``ids`` must not contain ``void_label``.
    Returns int64 [H, W].

    No ``np.unique(return_inverse=True)`` (slow, reference §3.6): one ``np.take`` through a lookup table
    when the value range is small, else a binary search over the few listed ids.
    """
    n = len(ids)
    lo, hi = int(label_map.min()), int(label_map.max())
    # Table over [min(lo, 0), hi]; negative values sit at the end and are reached by np.take(mode="wrap"),
    # which saves the per-pixel subtraction and the bounds check.
    first = min(lo, 0)
    span = hi - first + 1
    if span <= max(LUT_MIN_SIZE, LUT_MAX_FACTOR * label_map.size):
        lut = np.full(span, (n + 1) * scale + shift, dtype=np.int64)
        inside = (ids >= lo) & (ids <= hi)
        lut[ids[inside]] = np.nonzero(inside)[0] * scale + shift  # negative ids wrap like the lookup below
        if lo <= void_label <= hi:
            lut[void_label] = n * scale + shift
        return np.take(lut, label_map, mode="wrap", out=out)
    known = np.append(ids, void_label).astype(np.int64)
    order = np.argsort(known, kind="stable")
    sorted_known = known[order]
    pos = np.searchsorted(sorted_known, label_map)
    np.minimum(pos, len(sorted_known) - 1, out=pos)
    hit = sorted_known[pos] == label_map
    return np.where(hit, order[pos] * scale + shift, (n + 1) * scale + shift)


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...]) -> np.ndarray:
    """A per-thread int64 buffer reused from image to image: a fresh 8-16 MB array per image costs its page
    faults every time (about a tenth of the in-memory path at 1024x2048)."""
    size = math.prod(shape)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=np.int64)
        _SCRATCH.buf = buf
    return buf[:size].reshape(shape)


def run_starts(gt: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
    """Flat indices where a run of equal (gt, pred) values starts (row-major, index 0 first), or None when
    there are more than ``MAX_RUN_FRACTION`` runs per pixel. ``gt`` and ``pred`` are 1-D of one size."""
    if gt.size == 0:
        return None
    change = np.empty(gt.size, dtype=bool)
    change[0] = True
    np.not_equal(gt[1:], gt[:-1], out=change[1:])
    change[1:] |= pred[1:] != pred[:-1]
    if np.count_nonzero(change) > MAX_RUN_FRACTION * gt.size:
        return None
    return np.flatnonzero(change)


def pair_table(gt: np.ndarray, g_ids: np.ndarray, pred: np.ndarray, p_ids: np.ndarray, void_label: int):
    """Pixel counts of every (GT, prediction) pair: int64 [len(g_ids) + 2, len(p_ids) + 2].

    Rows: ``g_ids`` in order, GT void, other GT values; columns: ``p_ids`` in order, predicted void, other
    predicted values. Counts runs of equal pairs (`run_starts`) weighted by their lengths, or every pixel.
    """
    g, p = np.ravel(gt), np.ravel(pred)
    starts = run_starts(g, p)
    if starts is None:
        return count_pairs(g, g_ids, p, p_ids, void_label)
    return count_pairs(g[starts], g_ids, p[starts], p_ids, void_label, np.diff(starts, append=g.size))


def count_pairs(
    gt: np.ndarray,
    g_ids: np.ndarray,
    pred: np.ndarray,
    p_ids: np.ndarray,
    void_label: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """`pair_table` over 1-D values, each counted ``weights[i]`` times (once when None).

    One ``np.bincount`` over an int64 key: the compacted GT index times the width plus either the raw
    predicted value (when its range is small, as for ``class * divisor + instance`` maps: a single table
    lookup per value) or the compacted predicted index (a second lookup).
    """
    n_g, n_p = len(g_ids), len(p_ids)

    def bincount(key: np.ndarray, size: int) -> np.ndarray:
        if weights is None:
            return np.bincount(key, minlength=size)
        # Float64 sums of integer run lengths are exact below 2^53 pixels.
        return np.bincount(key, weights=weights, minlength=size).astype(np.int64)

    lo, hi = int(pred.min()), int(pred.max())
    span = hi - lo + 1
    if (n_g + 2) * span <= max(LUT_MIN_SIZE, WIDE_TABLE_MAX_FACTOR * pred.size):
        # key = row * span + (pred - lo); the "- lo" is folded into the GT table values.
        key = compact_ids(gt, g_ids, void_label, scale=span, shift=-lo, out=_scratch(gt.shape))
        key += pred
        wide = bincount(key, (n_g + 2) * span).reshape(n_g + 2, span)
        table = np.zeros((n_g + 2, n_p + 2), dtype=np.int64)
        inside = (p_ids >= lo) & (p_ids <= hi)
        table[:, np.nonzero(inside)[0]] = wide[:, p_ids[inside] - lo]
        listed = wide[:, p_ids[inside] - lo].sum(axis=1)
        if lo <= void_label <= hi:
            table[:, n_p] = wide[:, void_label - lo]
            listed += table[:, n_p]
        table[:, n_p + 1] = wide.sum(axis=1) - listed
        return table
    width = n_p + 2
    key = compact_ids(gt, g_ids, void_label, scale=width)
    key += compact_ids(pred, p_ids, void_label)
    return bincount(key, (n_g + 2) * width).reshape(n_g + 2, width)
