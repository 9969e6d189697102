"""Learning acceptance: the `tiny` preset overfits 4 synthetic panoptic images to PQ >= 95 (on the grid), and
with the input-resolution mask loss to PQ >= 93 against the full-resolution labels.

The images (65 x 65: two stuff regions split at a random row, discs and squares as two thing classes)
are generated here; targets are built at the output-stride grid by strided subsampling (as the reference
implementations do), the model is trained with the real criterion and training step (pipeline.train.step), and
the post-processed predictions are scored against the targets with the project's PQ (`pipeline.eval.pq`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import kmax_model
from kmax_model.criterion import build_criterion
from kmax_model.postprocess import panoptic_inference
from kmax_model.targets import IGNORE_INDEX, Target, normalize_images
from pipeline.train.step import Trainee, train_step

SIZE = 65  # 2 * 32 + 1: the 17 x 17 output-stride grid aligns corner to corner with the image
STRIDE = 4
DIV = 1000
NUM_IMAGES = 4
# contiguous classes: 0 disc, 1 square (things); 2 sky, 3 ground (stuff)
IS_THING = [True, True, False, False]
COLOURS = {0: (220, 40, 40), 1: (40, 60, 220), 2: (140, 200, 240), 3: (90, 160, 60)}
CATEGORY_IDS = [11, 12, 21, 22]  # "dataset" category ids, to exercise the contiguous -> dataset mapping
STEPS = 300  # PQ reached 0.93 after 150 steps and 0.99 after 200 in the measured run
LEARNING_RATE = 1e-2
SEED = 0


def _synthetic_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image [H, W, 3] and its panoptic label map (class * DIV + instance)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    horizon = int(rng.integers(20, 45))
    label = np.where(yy < horizon, 2 * DIV, 3 * DIV).astype(np.int32)
    counts = {0: 0, 1: 0}
    placed: list[tuple[int, int, int]] = []
    while len(placed) < int(rng.integers(2, 4)):
        r = int(rng.integers(7, 11))
        cy, cx = (int(v) for v in rng.integers(r + 1, SIZE - r - 1, size=2))
        if any(abs(cy - py) < r + pr + 4 and abs(cx - px) < r + pr + 4 for py, px, pr in placed):
            continue
        placed.append((cy, cx, r))
        cls = len(placed) % 2 if len(placed) < 3 else int(rng.integers(0, 2))
        counts[cls] += 1
        if cls == 0:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        label[inside] = cls * DIV + counts[cls]
    image = np.zeros((SIZE, SIZE, 3), dtype=np.float64)
    for cls, colour in COLOURS.items():
        image[label // DIV == cls] = colour
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _segments(label: np.ndarray) -> list[dict]:
    out = []
    for value in np.unique(label):
        cls = int(value) // DIV
        out.append(
            {
                "id": int(value),
                "category_id": CATEGORY_IDS[cls],
                "class_id": cls,
                "isthing": IS_THING[cls],
                "iscrowd": 0,
                "area": int((label == value).sum()),
            }
        )
    return out


def _target(label: np.ndarray) -> Target:
    """Target at the output-stride grid (strided subsampling of the full-resolution label)."""
    grid = torch.from_numpy(label[::STRIDE, ::STRIDE].copy())
    values = torch.unique(grid)
    masks = torch.stack([(grid == v).float() for v in values])
    labels = (values // DIV).long()
    area = (masks * masks.sum((1, 2), keepdim=True)).sum(0)
    return Target(
        masks=masks,
        labels=labels,
        valid=torch.ones_like(grid, dtype=torch.bool),
        semantic=(grid // DIV).long(),
        area=area,
    )


def _pq(gt_labels: list[np.ndarray], predictions: list[tuple[torch.Tensor, list[dict]]]) -> dict:
    from pipeline.eval.pq import pq_image_stats, reduce_pq_stats

    categories = [{"id": c, "isthing": t} for c, t in zip(CATEGORY_IDS, IS_THING)]
    stats = [
        pq_image_stats(gt, _segments(gt), pred.numpy(), segs, categories, index=i, image_id=i)
        for i, (gt, (pred, segs)) in enumerate(zip(gt_labels, predictions))
    ]
    return reduce_pq_stats(stats, categories, chunks=1)


def _samples() -> tuple[list[tuple[np.ndarray, np.ndarray]], torch.Tensor]:
    rng = np.random.default_rng(SEED)
    samples = [_synthetic_image(rng) for _ in range(NUM_IMAGES)]
    images = normalize_images(torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2))
    return samples, images


def _train(cfg, images: torch.Tensor, targets: list[Target]) -> tuple[torch.nn.Module, dict, dict]:
    """STEPS full-batch AdamW steps of the project's training step (pipeline.train.step, as the Ray
    workers run it); returns the model and the first and last loss dicts."""
    torch.manual_seed(SEED)
    model = kmax_model.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    trainee = Trainee(model, build_criterion(cfg), optimizer)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    first: dict[str, float] = {}
    for _ in range(STEPS):
        losses = train_step(trainee, lambda: (images, targets), generator=generator)
        assert math.isfinite(losses["loss"])
        first = first or losses
    return model, first, losses


def _predict(model, cfg, images: torch.Tensor, output_size: tuple[int, int] | None = None) -> list:
    """Panoptic predictions of the eval-mode model, at the grid or resized to ``output_size``."""
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert "semantic_logits" not in outputs  # training-only head
    return [
        panoptic_inference(
            outputs["class_logits"][b],
            outputs["mask_logits"][b],
            IS_THING,
            DIV,
            cfg.postprocess,
            output_size=output_size,
            category_ids=CATEGORY_IDS,
        )
        for b in range(NUM_IMAGES)
    ]


def _full_resolution_pq(model, cfg, images: torch.Tensor, labels: list[np.ndarray]) -> dict:
    """PQ against the full-resolution labels (mask logits upsampled 17 -> 65 px, align_corners=True)."""
    return _pq(labels, _predict(model, cfg, images, (SIZE, SIZE)))


@pytest.mark.slow
def test_tiny_preset_overfits_four_images_to_pq_95(single_torch_thread) -> None:
    samples, images = _samples()
    gt_grid = [s[1][::STRIDE, ::STRIDE].copy() for s in samples]
    targets = [_target(s[1]) for s in samples]
    assert all(int(t["semantic"].min()) != IGNORE_INDEX for t in targets)

    cfg = dataclasses.replace(kmax_model.preset("tiny"), num_classes=len(IS_THING))
    model, first, last = _train(cfg, images, targets)
    # mask-ID and semantic CE collapse (the PQ-style terms start tiny: they are weighted by the matched
    # class probability and dice; instance discrimination keeps its floor, the entropy of its soft targets)
    assert last["loss_mask_id"] < 0.05 * first["loss_mask_id"]
    assert last["loss_semantic"] < 0.05 * first["loss_semantic"]

    result = _pq(gt_grid, _predict(model, cfg, images))
    assert result["All"]["pq"] >= 0.95, result  # measured: 1.000 (PQ, SQ and RQ) after 300 steps
    assert result["Things"]["n"] == 2 and result["Stuff"]["n"] == 2

    # At full resolution every segment is still recognised; SQ is bounded by the 4-pixel output stride on
    # these small shapes (measured PQ 0.864): the grid loss never sees where a boundary lies between grid
    # points (the next test removes that bound).
    full_result = _full_resolution_pq(model, cfg, images, [s[1] for s in samples])
    assert full_result["All"]["rq"] == 1.0 and 0.8 <= full_result["All"]["pq"] < 0.9, full_result


@pytest.mark.slow
def test_input_resolution_mask_loss_overfits_the_full_resolution_labels(single_torch_thread) -> None:
    """The same images and schedule with loss.mask_loss_at=input (every input pixel): PQ against the
    full-resolution labels rises from the grid loss's 0.864 to 0.953 (measured)."""
    samples, images = _samples()
    targets = []
    for _, label in samples:
        target = _target(label)
        values = torch.unique(torch.from_numpy(label[::STRIDE, ::STRIDE].copy()))  # _target's mask order
        index = torch.full((SIZE, SIZE), -1, dtype=torch.int64)
        for j, value in enumerate(values.tolist()):
            index[torch.from_numpy(label) == value] = j
        targets.append(Target(**target, input_index=index))
    cfg = dataclasses.replace(kmax_model.preset("tiny"), num_classes=len(IS_THING))
    loss = dataclasses.replace(cfg.loss, mask_loss_at="input", mask_loss_points=0)
    cfg = dataclasses.replace(cfg, loss=loss)
    model, _, _ = _train(cfg, images, targets)
    result = _full_resolution_pq(model, cfg, images, [s[1] for s in samples])
    assert result["All"]["rq"] == 1.0 and result["All"]["pq"] >= 0.93, result
