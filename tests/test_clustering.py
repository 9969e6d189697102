"""The pixel-to-cluster assignment and centre update as pure functions (kmax_model.clustering)."""

from __future__ import annotations

import pytest
import torch

from kmax_model.axial_attention import relative_index
from kmax_model.clustering import (
    assign_pixels,
    cluster_update,
    coordinate_grid,
    hard_assignment_map,
    reference_positions,
)


def _logits(b=2, n=5, length=37, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, length, generator=g).requires_grad_(requires_grad)


def test_argmax_assignment_is_one_hot_without_gradient():
    logits = _logits()
    a = assign_pixels(logits, "argmax")
    assert a.dtype == torch.float32 and a.shape == logits.shape
    assert not a.requires_grad and a.grad_fn is None
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a.sum(1), torch.ones(2, 37))  # every pixel in exactly one cluster
    assert torch.equal(a.argmax(1), logits.argmax(1))


def test_update_is_the_sum_over_assigned_pixels():
    logits = _logits(b=2, n=4, length=23, seed=3)
    values = torch.randn(2, 6, 23, generator=torch.Generator().manual_seed(4))
    a = assign_pixels(logits, "argmax")
    u = cluster_update(a, values)
    expected = torch.zeros(2, 4, 6)
    ids = logits.argmax(1)
    for b in range(2):
        for p in range(23):
            expected[b, ids[b, p]] += values[b, :, p]
    torch.testing.assert_close(u, expected)
    # A cluster that receives no pixel gets a zero update (no mean, no division).
    counts = torch.stack([torch.bincount(ids[b], minlength=4) for b in range(2)])
    assert torch.equal(u.abs().sum(-1) == 0, counts == 0)


@pytest.mark.parametrize(("mode", "axis"), [("cluster_softmax", 1), ("spatial_softmax", 2)])
def test_softmax_modes_are_differentiable_through_the_assignment(mode, axis):
    logits = _logits(seed=5)
    a = assign_pixels(logits, mode)
    torch.testing.assert_close(a.sum(axis), torch.ones(a.sum(axis).shape))
    ref = torch.softmax(logits.detach(), dim=axis)
    torch.testing.assert_close(a, ref)
    values = torch.randn(2, 3, 37)
    cluster_update(a, values).square().sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()


def test_argmax_blocks_gradient_to_logits_but_not_to_values():
    logits = _logits(seed=6)
    values = torch.randn(2, 3, 37, requires_grad=True)
    cluster_update(assign_pixels(logits, "argmax"), values).sum().backward()
    assert logits.grad is None  # stop-gradient: no path from the update to the assignment logits
    assert torch.equal(values.grad, torch.ones_like(values))  # each pixel counted once


def test_assignment_runs_in_fp32_under_autocast_and_rejects_unknown_modes():
    logits = _logits(requires_grad=False).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for mode in ("argmax", "cluster_softmax", "spatial_softmax"):
            assert assign_pixels(logits, mode).dtype == torch.float32
        assert (
            cluster_update(assign_pixels(logits, "argmax"), torch.randn(2, 3, 37).bfloat16()).dtype
            == torch.float32
        )
    with pytest.raises(ValueError, match="decoder.assignment"):
        assign_pixels(logits, "kmeans")


def test_coordinates_and_reference_positions_hand_computed():
    grid = coordinate_grid(2, 4)
    torch.testing.assert_close(grid[0, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(grid[0, 1, :, 0], torch.tensor([-0.5, 0.5]))
    # Cluster 0 owns the left half of a 1x4 row, cluster 1 the right half.
    logits = torch.tensor([[50.0, 50.0, -50.0, -50.0], [-50.0, -50.0, 50.0, 50.0]]).reshape(1, 2, 1, 4)
    ref = reference_positions(logits, coordinate_grid(1, 4))
    torch.testing.assert_close(ref, torch.tensor([[[-0.5, 0.0], [0.5, 0.0]]]), atol=1e-5, rtol=0)
    assert torch.equal(hard_assignment_map(logits), torch.tensor([[[0, 0, 1, 1]]]))


def test_relative_position_index_clamps_beyond_the_table():
    idx = relative_index(5, 3, torch.device("cpu"))  # table rows 0..4, distance d -> clamp(d, -2, 2) + 2
    assert idx[0].tolist() == [2, 3, 4, 4, 4]
    assert idx[4].tolist() == [0, 0, 0, 1, 2]
    assert idx.diagonal().tolist() == [2] * 5
