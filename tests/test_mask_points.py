"""Mask losses at input resolution (LossConfig.mask_loss_at = "input", kmax_model.mask_points)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kmax_model.config_objective import LossConfig
from kmax_model.criterion import Criterion
from kmax_model.mask_points import (
    mask_logits_at,
    sample_hard_input_points,
    sample_input_points,
    slot_targets_at,
)
from kmax_model.postprocess import upsample_mask_logits
from pipeline.config import AugmentConfig
from pipeline.data.augment import augment_record
from pipeline.data.targets import build_target
from tests.test_criterion import K, _outputs, _target, _targets

GRID = LossConfig(insdis_sample_k=16, semantic_sample_k=16)
INPUT_ALL = dataclasses.replace(GRID, mask_loss_at="input", mask_loss_points=0)
MASK_KEYS = ("loss_pq_dice", "loss_mask_id")


def _with_input_index(targets: list) -> list:
    """At stride 1 the input label is the grid label: input_index = the owner map of each target."""
    out = []
    for t in targets:
        index = torch.full(t["valid"].shape, -1, dtype=torch.int64)
        for j, mask in enumerate(t["masks"]):
            index[mask > 0] = j
        out.append({**t, "input_index": index})
    return out


def test_at_stride_one_every_pixel_equals_the_grid_losses() -> None:
    """Input = grid (stride 1) and every pixel read: dice, mask-ID and all other terms equal the reference
    grid losses, with the same gradients."""
    targets = _with_input_index(_targets(0))
    grid_out, input_out = _outputs(0), _outputs(0)
    grid = Criterion(GRID, K)(grid_out, targets, torch.Generator().manual_seed(1))
    at_input = Criterion(INPUT_ALL, K)(input_out, targets, torch.Generator().manual_seed(1))
    assert set(grid) == set(at_input)
    for key in grid:
        torch.testing.assert_close(at_input[key], grid[key], rtol=1e-6, atol=1e-7)
    sum(grid[k] for k in grid if k.startswith(MASK_KEYS)).backward()
    sum(at_input[k] for k in at_input if k.startswith(MASK_KEYS)).backward()
    torch.testing.assert_close(input_out["mask_logits"].grad, grid_out["mask_logits"].grad)


def test_logits_are_read_where_inference_upsamples_them() -> None:
    """A ramp on a 3 x 4 grid read at the pixels of a 9 x 13 input (stride 4, corners aligned): logit(y, x)
    = y / 4 + 10 x / 4 exactly, and the points agree with kmax_model.postprocess.upsample_mask_logits."""
    gy, gx = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    logits = torch.stack([gy + 10 * gx, -gy])[None]  # 1 x 2 x 3 x 4
    index = torch.zeros(1, 9, 13, dtype=torch.int64)
    every = mask_logits_at(logits, sample_input_points(index, 0))
    py, px = torch.meshgrid(torch.arange(9.0), torch.arange(13.0), indexing="ij")
    torch.testing.assert_close(every[0, 0], (py / 4 + 10 * px / 4).flatten())
    torch.testing.assert_close(every[0], upsample_mask_logits(logits[0], (9, 13)).flatten(1))
    points = sample_input_points(index, 20, torch.Generator().manual_seed(0))
    sampled = mask_logits_at(logits, points)
    xy = (points.coords[0] + 1) / 2 * torch.tensor([12.0, 8.0])  # back to pixel (x, y)
    torch.testing.assert_close(xy, xy.round())  # integer pixels
    torch.testing.assert_close(sampled[0, 0], xy[:, 1] / 4 + 10 * xy[:, 0] / 4, rtol=1e-5, atol=1e-5)


def test_sampling_is_uniform_without_replacement_inside_masks_and_reproducible() -> None:
    index = torch.full((2, 20, 30), -1, dtype=torch.int64)
    index[0, :10] = 0  # 300 pixels in a mask
    index[1, :2, :5] = 1  # only 10
    points = sample_input_points(index, 50, torch.Generator().manual_seed(3))
    again = sample_input_points(index, 50, torch.Generator().manual_seed(3))
    torch.testing.assert_close(points.coords, again.coords)
    assert points.gt_index.shape == (2, 50)
    assert bool((points.gt_index[0] == 0).all())  # enough pixels in masks: only those are taken
    assert int(points.valid[1].sum()) == 10  # all 10, then pixels in no mask fill up the K
    pixels = {tuple(p) for p in points.coords[0].tolist()}
    assert len(pixels) == 50  # without replacement
    # Uniform: over many draws every in-mask row of image 0 is hit about equally often (expected 500 each).
    rows = torch.zeros(10)
    for seed in range(100):
        coords = sample_input_points(index, 50, torch.Generator().manual_seed(seed)).coords
        ys = (coords[0, :, 1] + 1) / 2 * 19
        rows += torch.bincount(ys.round().long(), minlength=20)[:10]
    assert float(rows.min()) > 400 and float(rows.max()) < 600


def test_slot_targets_follow_the_matching() -> None:
    index = torch.tensor([[[0, 1, -1, 2, 1]]]).flatten(1)  # 1 x 5 points
    points = sample_input_points(index.view(1, 1, 5), 0)
    gt_to_slot = torch.tensor([[3, 0, -1]])  # GT 0 -> slot 3, GT 1 -> slot 0, GT 2 unmatched
    target = slot_targets_at(points, gt_to_slot, 4)
    expected = torch.zeros(1, 4, 5)
    expected[0, 3, 0] = expected[0, 0, 1] = expected[0, 0, 4] = 1
    torch.testing.assert_close(target, expected)


def _flat_pixels(points, width: int, height: int) -> list[int]:
    xy = ((points.coords[0] + 1) / 2 * torch.tensor([width - 1.0, height - 1.0])).round().long()
    return (xy[:, 1] * width + xy[:, 0]).tolist()


def _spill_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 20 x 30 input: GT 0 = left half, GT 1 = right half with a 4 x 5 (20 px) patch that is GT 2 (a small
    object). Slot 0 wins on the left half, slot 1 on the whole right half, so GT 2's pixels (matched to
    slot 2) are confidently wrong: p(slot 2) ~ e^-8 there, ~1 - e^-8 elsewhere."""
    index = torch.zeros(1, 20, 30, dtype=torch.int64)
    index[0, :, 15:] = 1
    index[0, 8:12, 20:25] = 2
    logits = torch.zeros(1, 3, 20, 30)
    logits[0, 0, :, :15] = 8.0
    logits[0, 1, :, 15:] = 8.0
    return index, logits, torch.tensor([[0, 1, 2]])


def test_hard_points_are_the_wrongly_assigned_pixels() -> None:
    """Ratio 0.5 of 40 points with every pixel a candidate: the 20 hard points are exactly the 20 pixels
    given to the wrong slot, the other 20 are distinct uniform picks among the rest; reproducible."""
    index, logits, gt_to_slot = _spill_case()
    points = sample_hard_input_points(
        index, logits, gt_to_slot, 40, 0.5, 15.0, torch.Generator().manual_seed(0)
    )
    assert points.gt_index.tolist()[0][:20] == [2] * 20
    pixels = _flat_pixels(points, 30, 20)
    assert sorted(pixels[:20]) == [y * 30 + x for y in range(8, 12) for x in range(20, 25)]
    assert len(set(pixels)) == 40 and 2 not in points.gt_index[0, 20:].tolist()
    again = sample_hard_input_points(
        index, logits, gt_to_slot, 40, 0.5, 15.0, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(points.coords, again.coords)
    # An unmatched GT mask's pixels are never ranked hard (no slot to be wrong about).
    unmatched = sample_hard_input_points(index, logits, torch.tensor([[0, 1, -1]]), 40, 0.5, 15.0)
    assert unmatched.gt_index[0, :20].tolist().count(2) < 20


def test_hard_ratio_zero_is_the_uniform_sample_and_one_is_all_hard() -> None:
    index, logits, gt_to_slot = _spill_case()
    uniform = sample_input_points(index, 50, torch.Generator().manual_seed(4))
    zero = sample_hard_input_points(index, logits, gt_to_slot, 50, 0.0, 3.0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(zero.coords, uniform.coords)  # the first K of 3K uniform candidates
    torch.testing.assert_close(zero.gt_index, uniform.gt_index)
    every = sample_hard_input_points(index, logits, gt_to_slot, 30, 1.0, 1000.0)
    assert every.gt_index[0].tolist().count(2) == 20 and len(set(_flat_pixels(every, 30, 20))) == 30


def test_hard_sampling_raises_the_mask_id_loss_of_a_spilled_mask() -> None:
    """Through the criterion (GT 2 matched to slot 2 by its class): the hard sample holds every wrongly
    assigned pixel, so its mask-ID loss (mean cross-entropy over the sampled points) is ~7x the uniform
    one."""
    index, logits, _ = _spill_case()
    masks = torch.stack([(index[0] == j).float() for j in range(3)])
    target = {
        **_target(index[0], [0, 1, 2]),
        "input_index": index[0],
    }
    assert torch.equal(target["masks"], masks)
    cls = torch.full((1, 3, K + 1), -5.0)
    for j in range(3):
        cls[0, j, j] = 5.0
    outputs = {"class_logits": cls, "mask_logits": logits, "pixel_feature": torch.ones(1, 4, 20, 30)}
    base = dataclasses.replace(INPUT_ALL, mask_loss_points=60, mask_loss_oversample=10.0, insdis_weight=0.0)
    mask_id = {
        ratio: float(
            Criterion(dataclasses.replace(base, mask_loss_hard_ratio=ratio), K)(
                outputs, [target], torch.Generator().manual_seed(2)
            )["loss_mask_id"]
        )
        for ratio in (0.0, 0.75)
    }
    # Uniform: ~2 of 60 points on GT 2 (20 of 600 px); hard (every pixel a candidate): all 20. Each costs
    # ~8 nats, the rest ~0: about 2.7 against 0.27.
    assert mask_id[0.75] > 2.5 and mask_id[0.0] < 1.0
    with pytest.raises(ValueError, match="loss.mask_loss_hard_ratio"):
        LossConfig(mask_loss_hard_ratio=1.5)
    with pytest.raises(ValueError, match="loss.mask_loss_oversample"):
        LossConfig(mask_loss_oversample=0.5)


def test_input_loss_sees_a_boundary_between_grid_points() -> None:
    """Two masks split at input column 6 of a 9 x 13 input (grid columns 0..3 at input 0, 4, 8, 12): the grid
    targets are the same whether the boundary is at column 5 or 7, the input-resolution dice is not, and it
    is lower for the logits whose upsampled 50% crossing lies on the true boundary."""
    owner_grid = torch.tensor([[0, 0, 1, 1]] * 3)
    grid_target = _target(owner_grid, [0, 1])

    def with_boundary(col: int) -> dict:
        index = torch.zeros(9, 13, dtype=torch.int64)
        index[:, col:] = 1
        return {**grid_target, "input_index": index}

    def logits(crossing: float) -> dict:  # slot 0 - slot 1 logit difference crosses 0 at input x = crossing
        x = torch.arange(4.0) * 4
        diff = (crossing - x).expand(3, 4) * 2.0
        mask = torch.stack([diff, -diff, torch.full_like(diff, -50)])[None]
        cls = torch.full((1, 3, K + 1), -5.0)
        cls[0, 0, 0] = cls[0, 1, 1] = 5.0
        feats = torch.nn.functional.normalize(torch.randn(1, 4, 3, 4), dim=1)
        return {"class_logits": cls, "mask_logits": mask, "pixel_feature": feats}

    crit = Criterion(dataclasses.replace(INPUT_ALL, insdis_weight=0.0), K)
    on_grid = Criterion(dataclasses.replace(GRID, insdis_weight=0.0), K)
    at5, at7 = [with_boundary(c)["input_index"] for c in (5, 7)]
    assert not torch.equal(at5, at7)
    dice = {
        (truth, pred): float(crit(logits(pred), [with_boundary(truth)])["loss_pq_dice"])
        for truth in (5, 7)
        for pred in (4.5, 6.5)
    }
    assert dice[(5, 4.5)] < dice[(5, 6.5)] and dice[(7, 6.5)] < dice[(7, 4.5)]
    grid_dice = [float(on_grid(logits(p), [with_boundary(5)])["loss_pq_dice"]) for p in (4.5, 6.5)]
    assert grid_dice[0] != dice[(5, 4.5)]  # the grid loss is another quantity ...
    assert float(on_grid(logits(4.5), [with_boundary(7)])["loss_pq_dice"]) == grid_dice[0]  # ... blind to it


def test_missing_or_mismatched_input_index_is_refused() -> None:
    crit = Criterion(INPUT_ALL, K)
    with pytest.raises(ValueError, match=r"targets\[0\] lacks 'input_index'.*input_targets=True"):
        crit(_outputs(0), _targets(0), torch.Generator().manual_seed(0))
    targets = _with_input_index(_targets(0))
    targets[1]["input_index"] = torch.full((9, 9), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match="input_index sizes differ"):
        crit(_outputs(0), targets)
    with pytest.raises(ValueError, match="loss.mask_loss_at must be one of"):
        LossConfig(mask_loss_at="full")
    with pytest.raises(ValueError, match="loss.mask_loss_points"):
        LossConfig(mask_loss_points=-1)


def test_augment_builds_input_index_consistent_with_the_grid_masks() -> None:
    rng = np.random.default_rng(0)
    label = np.full((37, 41), 3000, np.int32)
    label[5:20, 8:30] = 1001  # a thing
    label[22:30, 2:9] = 1002  # a crowd thing: in no mask
    label[31:, 30:] = -1  # void
    label[0, 0] = 1003  # one pixel, flipped to (0, 44): on the grid, so a mask of its own
    label[1, 1] = 1004  # one pixel, flipped to (1, 43): between grid points, absent from the grid: in no mask
    segments = [
        {"id": 1001, "class_id": 1, "iscrowd": 0},
        {"id": 1002, "class_id": 1, "iscrowd": 1},
        {"id": 1003, "class_id": 1, "iscrowd": 0},
        {"id": 1004, "class_id": 1, "iscrowd": 0},
        {"id": 3000, "class_id": 3, "iscrowd": 0},
    ]
    image = rng.integers(0, 255, (37, 41, 3), dtype=np.uint8)
    cfg = AugmentConfig(crop_size=(37, 45), min_scale=1.0, max_scale=1.0, flip_prob=1.0, output_stride=4)
    aug = augment_record(image, label, "r", cfg, epoch=0, input_targets=True)
    assert aug["label_input"].shape == (37, 45)
    np.testing.assert_array_equal(aug["label_input"][::4, ::4], aug["label_grid"])
    target = build_target(aug["label_grid"], segments, aug["label_input"])
    index = target["input_index"].numpy()
    lab = aug["label_input"]
    masks = target["masks"].numpy()
    for j in range(masks.shape[0]):
        np.testing.assert_array_equal(index[::4, ::4] == j, masks[j] > 0)
        ids = np.unique(lab[index == j])
        assert len(ids) == 1  # one segment per mask index, and all its input pixels
        assert (index[lab == ids[0]] == j).all()
    assert (index[lab == 1002] == -1).all() and (index[lab == -1] == -1).all()
    assert (index[lab == 1004] == -1).all() and (index[lab == 1003] >= 0).all()
    assert "input_index" not in build_target(aug["label_grid"], segments)
