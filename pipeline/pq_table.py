"""Pixel counting for PQ: the (GT segment, predicted segment) intersection table of one image.

Split from `pipeline.pq` (which re-exports both functions). No ``np.unique(return_inverse=True)`` and no PNG
(shared/docs/reference_data_and_pq.md §3.6): label values are compacted with one ``np.take`` through a lookup
table (or a binary search over the few listed ids when the value range is huge), and one ``np.bincount``
counts an int64 key per pixel.
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


def pair_table(gt: np.ndarray, g_ids: np.ndarray, pred: np.ndarray, p_ids: np.ndarray, void_label: int):
    """Pixel counts of every (GT, prediction) pair: int64 [len(g_ids) + 2, len(p_ids) + 2].

    Rows: ``g_ids`` in order, GT void, other GT values; columns: ``p_ids`` in order, predicted void, other
    predicted values. One ``np.bincount`` over an int64 key per pixel: the compacted GT index times the width
    plus either the raw predicted value (when its range is small, as for ``class * divisor + instance`` maps:
    a single table lookup per pixel) or the compacted predicted index (a second lookup).
    """
    n_g, n_p = len(g_ids), len(p_ids)
    lo, hi = int(pred.min()), int(pred.max())
    span = hi - lo + 1
    if (n_g + 2) * span <= max(LUT_MIN_SIZE, WIDE_TABLE_MAX_FACTOR * pred.size):
        # key = row * span + (pred - lo); the "- lo" is folded into the GT table values.
        key = compact_ids(gt, g_ids, void_label, scale=span, shift=-lo, out=_scratch(gt.shape))
        key += pred
        wide = np.bincount(key.ravel(), minlength=(n_g + 2) * span).reshape(n_g + 2, span)
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
    return np.bincount(key.ravel(), minlength=(n_g + 2) * width).reshape(n_g + 2, width)
