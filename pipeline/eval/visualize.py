"""Pictures of panoptic maps and of the clustering, for MLflow artifacts (matplotlib, Agg backend).

- `colorize_panoptic(label_map, categories, label_divisor)`: RGB uint8 [H, W, 3]; each class gets its
  manifest colour, thing instances a deterministic brightness jitter so neighbours differ; void is black.
- `colorize_ids(ids)`: RGB for an integer map without semantics (e.g. cluster indices), fixed palette.
- `cluster_assignment_figure(image, assignments)`: one panel per decoder layer showing the pixel-to-cluster
  argmax of that layer (the k-means assignment refining layer by layer).
- `prediction_grid(images, gts, preds, ...)`: rows of (image, ground truth, prediction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

VOID_COLOR = (0, 0, 0)
INSTANCE_JITTER = 40
"""Max per-channel brightness offset between instances of one thing class."""

PANEL_INCHES = 2.2


def _palette(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct-ish RGB colours, deterministic."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(max(n, 1), 3), dtype=np.int64).astype(np.uint8)


def colorize_ids(ids: np.ndarray, void_value: int = -1) -> np.ndarray:
    """Integer map [H, W] -> RGB uint8 [H, W, 3]; ``void_value`` pixels black."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros(ids.shape + (3,), dtype=np.uint8)
    valid = ids != void_value
    if valid.any():
        pal = _palette(int(ids[valid].max()) + 1)
        out[valid] = pal[ids[valid]]
    return out


def colorize_panoptic(
    label_map: np.ndarray, categories: Sequence[Mapping], label_divisor: int, void_label: int = -1
) -> np.ndarray:
    """Panoptic label map [H, W] (class_id * divisor + instance) -> RGB uint8 [H, W, 3].

    ``categories``: manifest categories with ``class_id`` and optionally ``color`` ([r, g, b]); classes
    without a colour get one from a fixed palette.
    """
    label_map = np.asarray(label_map, dtype=np.int64)
    out = np.zeros(label_map.shape + (3,), dtype=np.uint8)
    num_classes = max((int(c["class_id"]) for c in categories), default=-1) + 1
    colors = _palette(num_classes).astype(np.int64)
    for c in categories:
        if c.get("color") is not None:
            colors[int(c["class_id"])] = np.asarray(c["color"], dtype=np.int64)[:3]
    for value in np.unique(label_map):
        if value == void_label:
            continue
        cls, inst = divmod(int(value), label_divisor)
        if cls >= num_classes:
            raise ValueError(f"label value {value} has class {cls} outside the {num_classes} categories")
        color = colors[cls].copy()
        if inst > 0:
            offset = np.random.default_rng(inst).integers(-INSTANCE_JITTER, INSTANCE_JITTER + 1, size=3)
            color = np.clip(color + offset, 0, 255)
        out[label_map == value] = color.astype(np.uint8)
    out[label_map == void_label] = VOID_COLOR
    return out


def _to_hwc_uint8(image: np.ndarray) -> np.ndarray:
    """[3, H, W] or [H, W, 3], uint8 range or normalised [-1, 1] -> uint8 [H, W, 3]."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        if img.min() < 0:  # normalised by kmax_model.targets.normalize_images
            img = (img + 1.0) * 127.5
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img


def cluster_assignment_figure(image: np.ndarray, assignments: Sequence[np.ndarray], title: str = ""):
    """Figure: the input image, then the cluster index map of every decoder layer.

    ``assignments``: list (one per decoder layer) of int [h, w] cluster indices (argmax over clusters).
    Colours follow the cluster index, so a stable colour across panels means a stable cluster.
    """
    n = len(assignments) + 1
    fig, axes = plt.subplots(1, n, figsize=(PANEL_INCHES * n, PANEL_INCHES), squeeze=False)
    axes = axes[0]
    axes[0].imshow(_to_hwc_uint8(image))
    axes[0].set_title("image", fontsize=8)
    num_clusters = max(int(np.max(a)) for a in assignments) + 1 if assignments else 1
    pal = _palette(num_clusters, seed=1)
    for i, a in enumerate(assignments):
        axes[i + 1].imshow(pal[np.asarray(a, dtype=np.int64)], interpolation="nearest")
        axes[i + 1].set_title(f"layer {i + 1}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def prediction_grid(
    images: Sequence[np.ndarray],
    gt_maps: Sequence[np.ndarray],
    pred_maps: Sequence[np.ndarray],
    categories: Sequence[Mapping],
    label_divisor: int,
    titles: Sequence[str] | None = None,
):
    """Figure with one row per image: image | ground truth | prediction (coloured panoptic maps)."""
    rows = len(images)
    if not (rows == len(gt_maps) == len(pred_maps)) or rows == 0:
        raise ValueError(
            f"prediction_grid needs equal, non-zero counts, got {rows}/{len(gt_maps)}/{len(pred_maps)}"
        )
    fig, axes = plt.subplots(rows, 3, figsize=(PANEL_INCHES * 3, PANEL_INCHES * rows), squeeze=False)
    for r in range(rows):
        panels = (
            _to_hwc_uint8(images[r]),
            colorize_panoptic(gt_maps[r], categories, label_divisor),
            colorize_panoptic(pred_maps[r], categories, label_divisor),
        )
        for c, (panel, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].axis("off")
            label = f"{titles[r]}: {name}" if titles and c == 0 else name
            axes[r, c].set_title(label, fontsize=8)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
