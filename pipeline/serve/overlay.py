"""Pictures of one prediction for people: the photo with its segments drawn, and the cluster maps.

`overlay` blends each segment's colour (`pipeline.eval.visualize.colorize_panoptic`: the category's
colour, a brightness jitter per thing instance; void left as the photo) into the photo, outlines every
segment and writes the class name of each thing on it (PIL's default font). `cluster_maps` paints each
decoder layer's pixel-to-cluster argmax, one colour per cluster, the same colour in every layer and image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.records import VOID_LABEL
from pipeline.eval.visualize import colorize_panoptic

SEGMENT_ALPHA = 0.5
"""Weight of the segment colour in the blend (the photo gets the rest)."""
OUTLINE_COLOR = (255, 255, 255)
TEXT_COLOR = (255, 255, 255)
TEXT_BACKGROUND = (0, 0, 0)
TEXT_PADDING = 1
"""Pixels of background around a class name."""
CLUSTER_PALETTE_SEED = 1
CLUSTER_COLOR_RANGE = (40, 256)
"""Cluster colours are drawn uniformly per channel from this range (dark colours left out)."""


def outlines(label_map: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels whose right or lower neighbour holds another label value."""
    edge = np.zeros(label_map.shape, bool)
    edge[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
    edge[:-1, :] |= label_map[:-1, :] != label_map[1:, :]
    return edge


def _label_anchor(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) where a segment's name goes: the segment pixel nearest the centroid of its pixels."""
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    nearest = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
    return int(cols[nearest]), int(rows[nearest])


def overlay(
    image: np.ndarray,
    label_map: np.ndarray,
    segments: Sequence[Mapping],
    categories: Sequence[Mapping],
    label_divisor: int,
) -> Image.Image:
    """The photo (uint8 RGB [H, W, 3]) with the prediction of `pipeline.eval.predictor.Predictor` drawn:
    ``label_map`` (``class_id * label_divisor + instance``, void `VOID_LABEL`) and its ``segments``;
    ``categories``: the manifest's (class_id, name, color)."""
    colours = colorize_panoptic(label_map, categories, label_divisor, void_label=VOID_LABEL)
    segment = (label_map != VOID_LABEL)[..., None]
    blend = image * (1.0 - SEGMENT_ALPHA) + colours * SEGMENT_ALPHA
    pixels = np.where(segment, np.rint(blend), image).astype(np.uint8)
    pixels[outlines(label_map)] = OUTLINE_COLOR
    picture = Image.fromarray(pixels)
    names = {int(c["class_id"]): str(c["name"]) for c in categories}
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    for seg in segments:
        mask = label_map == int(seg["id"])
        if not seg["isthing"] or not mask.any():
            continue
        xy, text = _label_anchor(mask), names.get(int(seg["class_id"]), str(seg["class_id"]))
        left, top, right, bottom = draw.textbbox(xy, text, font=font, anchor="mm")
        draw.rectangle(
            (left - TEXT_PADDING, top - TEXT_PADDING, right + TEXT_PADDING, bottom + TEXT_PADDING),
            fill=TEXT_BACKGROUND,
        )
        draw.text(xy, text, fill=TEXT_COLOR, font=font, anchor="mm")
    return picture


def cluster_palette(num_clusters: int) -> np.ndarray:
    """uint8 [num_clusters, 3]: the fixed colour of each cluster index."""
    rng = np.random.default_rng(CLUSTER_PALETTE_SEED)
    low, high = CLUSTER_COLOR_RANGE
    return rng.integers(low, high, size=(max(num_clusters, 1), 3)).astype(np.uint8)


def cluster_maps(assignments: Sequence[np.ndarray], size: tuple[int, int], num_clusters: int) -> list:
    """One RGB image of ``size`` (H, W) per decoder layer: the layer's int [h, w] cluster indices (cropped to
    the image, `pipeline.eval.predictor.Predictor` with ``return_assignments``) painted and resized with
    nearest-neighbour sampling."""
    palette = cluster_palette(num_clusters)
    height, width = size
    return [
        Image.fromarray(palette[np.asarray(a, dtype=np.int64)]).resize((width, height), Image.NEAREST)
        for a in assignments
    ]
