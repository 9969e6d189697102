"""Post-processing on hand-made toys with known segments: exact label maps and the threshold boundaries."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from kmax_model.config_objective import PostProcessConfig
from kmax_model.postprocess import (
    instance_inference,
    panoptic_inference,
    panoptic_inference_batch,
    semantic_inference,
    upsample_mask_logits,
)
from kmax_model.targets import VOID_LABEL

DIV = 1000
IS_THING = [True, True, False, False]  # classes 0, 1 things; 2, 3 stuff
HIGH = 20.0
# 4 x 6 toy. A/B share pixel (1, 1); S1 and S2 are the same stuff class; U is under the stuff threshold.
LAYOUT = {
    "A": (0, 0.90, [(0, 0), (0, 1), (1, 0), (1, 1)]),
    "B": (1, 0.85, [(1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]),
    "S1": (2, 0.80, [(0, 2), (0, 3), (1, 2), (1, 3)]),
    "T": (0, 0.70, [(0, 4), (0, 5), (1, 4), (1, 5)]),
    "S2": (2, 0.60, [(2, 2), (2, 3), (3, 2), (3, 3)]),
    "U": (3, 0.45, [(2, 4), (2, 5), (3, 4), (3, 5)]),
    "Z": (None, 0.0, []),  # an empty slot predicting void
}
SLOTS = list(LAYOUT)
LOOSE = PostProcessConfig(thing_area_limit=0, stuff_area_limit=0)  # COCO thresholds, no area limits


def _class_logits(class_id: int | None, prob: float) -> torch.Tensor:
    probs = torch.full((len(IS_THING) + 1,), 1e-4, dtype=torch.float64)
    if class_id is None:
        probs[-1] = 1.0
    else:
        probs[class_id] = prob
        probs[-1] = 1.0 - prob - 1e-4 * (len(IS_THING) - 1)
    return probs.log().float()


def _toy() -> tuple[torch.Tensor, torch.Tensor]:
    class_logits = torch.stack([_class_logits(c, p) for c, p, _ in LAYOUT.values()])
    mask_logits = torch.zeros(len(SLOTS), 4, 6)
    for i, (_, _, pixels) in enumerate(LAYOUT.values()):
        for r, c in pixels:
            mask_logits[i, r, c] = HIGH
    return class_logits, mask_logits


def _score(class_logits: torch.Tensor, slot: str) -> float:
    """The class score exactly as the post-processor computes it (same float32 op on the same tensor)."""
    return float(class_logits.float().softmax(-1)[:, :-1].max(-1).values[SLOTS.index(slot)])


EXPECTED = np.array(
    [
        [1, 1, 2000, 2000, 2, 2],
        [1, 1, 2000, 2000, 2, 2],
        [-1, -1, 2000, 2000, -1, -1],
        [-1, -1, 2000, 2000, -1, -1],
    ],
    dtype=np.int32,
)


def test_panoptic_toy_exact() -> None:
    class_logits, mask_logits = _toy()
    label, segments = panoptic_inference(
        class_logits, mask_logits, IS_THING, DIV, LOOSE, category_ids=[11, 12, 13, 14]
    )
    assert label.dtype == torch.int32
    np.testing.assert_array_equal(label.numpy(), EXPECTED)
    # B (4 of its 5 pixels still free = 0.8 * 5, not more) is dropped: overlap threshold boundary.
    # S1 and S2 (stuff class 2) share one segment id; U (0.45 < 0.5) is dropped; A ranks before T.
    assert [(s["id"], s["class_id"], s["isthing"], s["area"], s["category_id"]) for s in segments] == [
        (1, 0, True, 4, 11),
        (2, 0, True, 4, 11),
        (2000, 2, False, 8, 13),
    ]
    assert segments[2]["score"] == pytest.approx(0.8, rel=1e-4)  # best score of the merged stuff slots


def test_overlap_threshold_just_below_keeps_the_segment() -> None:
    class_logits, mask_logits = _toy()
    label, segments = panoptic_inference(
        class_logits, mask_logits, IS_THING, DIV, dataclasses.replace(LOOSE, overlap_threshold=0.79)
    )
    expected = EXPECTED.copy()
    expected[2:, :2] = 1 * DIV + 1  # B: class 1, instance 1; the shared pixel stays A's
    np.testing.assert_array_equal(label.numpy(), expected)
    assert {s["id"]: s["area"] for s in segments}[1001] == 4


def test_class_threshold_is_inclusive() -> None:
    class_logits, mask_logits = _toy()
    p_t = _score(class_logits, "T")
    at = dataclasses.replace(LOOSE, thing_threshold=p_t)
    label, _ = panoptic_inference(class_logits, mask_logits, IS_THING, DIV, at)
    np.testing.assert_array_equal(label.numpy(), EXPECTED)
    above = dataclasses.replace(LOOSE, thing_threshold=math.nextafter(p_t, 1.0))
    label, segments = panoptic_inference(class_logits, mask_logits, IS_THING, DIV, above)
    expected = EXPECTED.copy()
    expected[:2, 4:] = VOID_LABEL
    np.testing.assert_array_equal(label.numpy(), expected)
    assert [s["id"] for s in segments] == [1, 2000]
    # stuff threshold: S2 exactly at the threshold stays merged into the stuff segment
    p_s2 = _score(class_logits, "S2")
    label, _ = panoptic_inference(
        class_logits, mask_logits, IS_THING, DIV, dataclasses.replace(LOOSE, stuff_threshold=p_s2)
    )
    np.testing.assert_array_equal(label.numpy(), EXPECTED)
    label, _ = panoptic_inference(
        class_logits,
        mask_logits,
        IS_THING,
        DIV,
        dataclasses.replace(LOOSE, stuff_threshold=math.nextafter(p_s2, 1.0)),
    )
    assert (label[2:, 2:4] == VOID_LABEL).all() and (label[:2, 2:4] == 2000).all()


def test_area_limits() -> None:
    class_logits, mask_logits = _toy()
    cfg = dataclasses.replace(LOOSE, thing_area_limit=4, stuff_area_limit=8)  # area == limit is kept
    label, _ = panoptic_inference(class_logits, mask_logits, IS_THING, DIV, cfg)
    np.testing.assert_array_equal(label.numpy(), EXPECTED)
    cfg = dataclasses.replace(LOOSE, thing_area_limit=5, stuff_area_limit=8)
    label, segments = panoptic_inference(class_logits, mask_logits, IS_THING, DIV, cfg)
    expected = np.where(EXPECTED == 2000, 2000, VOID_LABEL).astype(np.int32)
    np.testing.assert_array_equal(label.numpy(), expected)
    assert [s["id"] for s in segments] == [2000]
    # the default COCO limits (stuff 6400 px) void everything on this toy
    label, segments = panoptic_inference(class_logits, mask_logits, IS_THING, DIV, PostProcessConfig.coco())
    assert (label == VOID_LABEL).all() and segments == []


def test_ranking_uses_mask_score() -> None:
    # two thing slots of class 0 with equal class probability: the one with the more confident mask
    # (higher mean in-mask probability) ranks first and takes the pixels.
    class_logits = torch.stack([_class_logits(0, 0.9), _class_logits(0, 0.9)])
    mask_logits = torch.zeros(2, 1, 4)
    mask_logits[0] = torch.tensor([2.0, 2.0, 2.0, 2.0])  # p0 = 0.88 on all four pixels
    mask_logits[1] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # p1 = 0.12: empty binary mask
    label, segments = panoptic_inference(class_logits, mask_logits, IS_THING, 10, LOOSE)
    assert label.tolist() == [[1, 1, 1, 1]] and len(segments) == 1
    # with reorder_class_weight only and a higher class prob, slot 1 would rank first but has no pixels
    class_logits[1] = _class_logits(0, 0.95)
    label, _ = panoptic_inference(class_logits, mask_logits, IS_THING, 10, LOOSE)
    assert label.tolist() == [[1, 1, 1, 1]]


def test_upsampling_is_align_corners_bilinear_and_crops() -> None:
    ramp = torch.tensor([[0.0, 1.0, 2.0]]).expand(3, 3)[None]  # 1 x 3 x 3
    up = upsample_mask_logits(ramp, (5, 5))
    assert up.shape == (1, 5, 5)
    assert up[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert upsample_mask_logits(ramp, (5, 5), (4, 3)).shape == (1, 4, 3)
    # stuff L (cols 0-1, p 0.9) and thing R (col 2, p 0.8) upsampled 3 -> 5 columns: the new column 3 lies
    # midway (both slots 0.5 > 0.4); L ranks first (0.9 * 1 > 0.8 * 0.75) and takes it, so R keeps 1 of its
    # 2 binary pixels: kept with overlap threshold 0.4, dropped with 0.5.
    class_logits = torch.stack([_class_logits(2, 0.9), _class_logits(0, 0.8)])
    mask_logits = torch.tensor([[[HIGH, HIGH, 0.0]] * 2, [[0.0, 0.0, HIGH]] * 2])
    cfg = dataclasses.replace(LOOSE, overlap_threshold=0.4)
    label, segments = panoptic_inference(class_logits, mask_logits, IS_THING, DIV, cfg, output_size=(3, 5))
    assert label.tolist() == [[2000, 2000, 2000, 2000, 1]] * 3
    assert [(s["id"], s["area"]) for s in segments] == [(1, 3), (2000, 12)]
    cfg = dataclasses.replace(LOOSE, overlap_threshold=0.5)
    label, _ = panoptic_inference(class_logits, mask_logits, IS_THING, DIV, cfg, output_size=(3, 5))
    assert label.tolist() == [[2000, 2000, 2000, 2000, -1]] * 3


def test_batch_helper_matches_single() -> None:
    class_logits, mask_logits = _toy()
    outputs = {
        "class_logits": class_logits[None].repeat(2, 1, 1),
        "mask_logits": mask_logits[None].repeat(2, 1, 1, 1),
    }
    results = panoptic_inference_batch(outputs, IS_THING, DIV, LOOSE, valid_sizes=[None, (2, 3)])
    np.testing.assert_array_equal(results[0][0].numpy(), EXPECTED)
    np.testing.assert_array_equal(results[1][0].numpy(), EXPECTED[:2, :3])
    with pytest.raises(ValueError, match="is_thing has 3 entries"):
        panoptic_inference(class_logits, mask_logits, [True, False, True], DIV, LOOSE)


def test_semantic_inference_hand_computed() -> None:
    class_logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))  # K = 2 (+ void)
    mask_logits = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])  # pixel 0: 0.5/0.5, pixel 1: 0.75/0.25
    scores = semantic_inference(class_logits, mask_logits)
    assert scores.shape == (2, 1, 2)
    expected = [
        [[0.5 * 0.6 + 0.5 * 0.2, 0.75 * 0.6 + 0.25 * 0.2]],
        [[0.5 * 0.3 + 0.5 * 0.2, 0.75 * 0.3 + 0.25 * 0.2]],
    ]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)


def test_instance_inference_scores_thing_pairs_only() -> None:
    # K = 3: classes 0, 2 things, 1 stuff. slot 0 is most confident about stuff class 1 (never returned).
    class_logits = torch.log(torch.tensor([[0.2, 0.7, 0.05, 0.05], [0.1, 0.1, 0.6, 0.2]]))
    mask_logits = torch.tensor([[[math.log(4.0), 0.0, -5.0]], [[0.0, 0.0, 5.0]]])
    cfg = dataclasses.replace(LOOSE, max_instances=3)
    result = instance_inference(class_logits, mask_logits, [True, False, True], cfg)
    probs = mask_logits.softmax(0)
    m0 = probs[0, 0]  # slot 0 mask probs: [0.8, 0.5, ~0]
    m1 = probs[1, 0]
    s_slot1_c2 = 0.6 * float((m1[1] + m1[2]) / 2)  # slot 1 mask = pixels 1 (0.5 > 0.4) and 2
    s_slot0_c0 = 0.2 * float((m0[0] + m0[1]) / 2)
    s_slot1_c0 = 0.1 * float((m1[1] + m1[2]) / 2)
    assert result["class_ids"].tolist() == [2, 0, 0]
    assert result["slots"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(result["scores"].numpy(), [s_slot1_c2, s_slot0_c0, s_slot1_c0], rtol=1e-5)
    assert result["masks"][1].tolist() == [[True, True, False]]
    assert result["masks"][0].tolist() == [[False, True, True]]


def test_postprocess_config_presets_and_validation() -> None:
    city = PostProcessConfig.for_dataset("cityscapes")
    assert (city.thing_threshold, city.stuff_threshold, city.overlap_threshold) == (0.5, 0.3, 0.9)
    assert (city.reorder_class_weight, city.reorder_mask_weight) == (1.0, 0.0)
    assert (city.thing_area_limit, city.stuff_area_limit) == (256, 2048)
    coco = PostProcessConfig.coco()
    assert (coco.thing_threshold, coco.stuff_threshold, coco.overlap_threshold) == (0.7, 0.5, 0.8)
    assert (coco.thing_area_limit, coco.stuff_area_limit, coco.pixel_confidence_threshold) == (400, 6400, 0.4)
    with pytest.raises(ValueError, match=r"postprocess\.overlap_threshold"):
        PostProcessConfig(overlap_threshold=1.5)
    with pytest.raises(ValueError, match=r"postprocess\.thing_area_limit"):
        PostProcessConfig(thing_area_limit=-1)
    with pytest.raises(ValueError, match="postprocess preset"):
        PostProcessConfig.for_dataset("kitti")
