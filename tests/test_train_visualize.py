"""Panoptic colouring and figures (exact colours on a hand-made map)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval import visualize as vis

CATS = [
    {"class_id": 0, "isthing": True, "color": [200, 10, 10]},
    {"class_id": 1, "isthing": False, "color": [10, 200, 10]},
]


def test_colorize_panoptic_exact():
    divisor = 1000
    label = np.array([[1, 1, 1000], [2, -1, 1000]], dtype=np.int32)  # two instances of class 0, stuff 1, void
    rgb = vis.colorize_panoptic(label, CATS, divisor)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 2]) == (10, 200, 10)  # stuff: exact class colour
    assert tuple(rgb[1, 1]) == (0, 0, 0)  # void black
    assert tuple(rgb[0, 0]) == tuple(rgb[0, 1])  # same instance, same colour
    assert tuple(rgb[0, 0]) != tuple(rgb[1, 0])  # instances differ
    assert np.abs(rgb[0, 0].astype(int) - [200, 10, 10]).max() <= vis.INSTANCE_JITTER
    with pytest.raises(ValueError, match="class 5 outside the 2 categories"):
        vis.colorize_panoptic(np.array([[5000]]), CATS, divisor)


def test_figures_render(tmp_path):
    img = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16)).astype(np.float32)
    fig = vis.cluster_assignment_figure(img, [np.zeros((4, 4), int), np.arange(16).reshape(4, 4)])
    assert len(fig.axes) == 3
    fig.savefig(tmp_path / "a.png")
    vis.close(fig)
    gt = np.full((16, 16), 1000, np.int32)
    fig = vis.prediction_grid([img, img], [gt, gt], [gt, np.full_like(gt, -1)], CATS, 1000, titles=["a", "b"])
    assert len(fig.axes) == 6
    fig.savefig(tmp_path / "b.png")
    vis.close(fig)
    assert (tmp_path / "b.png").stat().st_size > 0
    with pytest.raises(ValueError, match="equal, non-zero"):
        vis.prediction_grid([img], [], [], CATS, 1000)
