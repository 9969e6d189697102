"""Criterion: keys, weights, shared matching, PQ-style weights, M = 0, autocast, bad targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kmax_model.config import preset
from kmax_model.config_objective import LossConfig
from kmax_model.criterion import Criterion, build_criterion
from kmax_model.losses import pq_class_loss, pq_dice_loss
from kmax_model.targets import IGNORE_INDEX, Target

K, N, H, W, D = 3, 4, 5, 6, 8
SMALL = LossConfig(insdis_sample_k=16, semantic_sample_k=16)


def _target(owner: torch.Tensor, labels: list[int]) -> Target:
    """Target from an owner map (mask index per pixel, -1 = void)."""
    m = len(labels)
    masks = torch.stack([(owner == j).float() for j in range(m)]) if m else torch.zeros(0, *owner.shape)
    lab = torch.tensor(labels, dtype=torch.int64)
    valid = owner >= 0
    semantic = torch.where(
        valid, lab[owner.clamp(min=0)] if m else owner, torch.full_like(owner, IGNORE_INDEX)
    )
    area = (masks * masks.sum((1, 2), keepdim=True)).sum(0)
    return Target(masks=masks, labels=lab, valid=valid, semantic=semantic.long(), area=area)


def _outputs(seed: int, batch: int = 2, num_aux: int = 2, semantic: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)

    def one() -> dict:
        return {
            "class_logits": torch.randn(batch, N, K + 1, generator=g).requires_grad_(),
            "mask_logits": (3 * torch.randn(batch, N, H, W, generator=g)).requires_grad_(),
            "pixel_feature": torch.nn.functional.normalize(torch.randn(batch, D, H, W, generator=g), dim=1)
            .detach()
            .requires_grad_(),
        }

    out = one()
    out["aux_outputs"] = [one() for _ in range(num_aux)]
    if semantic:
        out["semantic_logits"] = torch.randn(batch, K + 1, H, W, generator=g).requires_grad_()
    return out


def _targets(seed: int) -> list[Target]:
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(-1, 3, (H, W), generator=g)
    return [_target(owner, [0, 2, 1]), _target(torch.full((H, W), -1), [])]  # second image: M = 0


def test_keys_weights_total_and_backward() -> None:
    outputs, targets = _outputs(0), _targets(0)
    criterion = Criterion(SMALL, K)
    losses = criterion(outputs, targets, torch.Generator().manual_seed(0))
    base = ["loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_insdis"]
    expected = set(base) | {f"{k}_aux{i}" for k in base for i in range(2)} | {"loss_semantic"}
    assert set(losses) == expected
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
        assert value.dtype == torch.float32
    assert criterion.weight_of("loss_pq_class_aux1") == 3.0
    assert criterion.weight_of("loss_mask_id") == pytest.approx(0.3)
    assert criterion.weights(losses)["loss_semantic"] == 1.0
    with pytest.raises(KeyError, match="loss_bogus"):
        criterion.weight_of("loss_bogus")
    total = criterion.total(losses)
    assert total.item() == pytest.approx(
        sum(criterion.weight_of(k) * v.item() for k, v in losses.items()), rel=1e-5
    )
    total.backward()
    for out in [outputs, *outputs["aux_outputs"]]:
        for key in ("class_logits", "mask_logits", "pixel_feature"):
            assert out[key].grad is not None and torch.isfinite(out[key].grad).all()
    assert outputs["mask_logits"].grad.abs().sum() > 0


def test_zero_weight_terms_are_skipped_and_no_semantic_without_logits() -> None:
    cfg = dataclasses.replace(SMALL, insdis_weight=0.0, mask_id_weight=0.0)
    losses = Criterion(cfg, K)(_outputs(1, num_aux=1, semantic=False), _targets(1))
    assert set(losses) == {"loss_pq_class", "loss_pq_dice", "loss_pq_class_aux0", "loss_pq_dice_aux0"}


def test_all_images_without_ground_truth() -> None:
    outputs = _outputs(2)
    empty = [_target(torch.full((H, W), -1), []), _target(torch.full((H, W), -1), [])]
    losses = Criterion(SMALL, K)(outputs, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_pq_dice"].item() == 0.0 and losses["loss_mask_id"].item() == 0.0
    # every slot is unmatched -> pushed to void with weight 0.25 * void_ratio (= 0.25 * ~1 here)
    logp_void = outputs["class_logits"].detach().log_softmax(-1)[..., K]
    expected = (-(0.25 * (1 / (1 + 1e-5 / (H * W)))) * logp_void).mean()
    assert losses["loss_pq_class"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_slot_targets_hand_checked() -> None:
    # one image, 2x2 grid: mask 0 (class 1) = pixels {0, 1}, mask 1 (class 0) = pixel 2, pixel 3 void
    owner = torch.tensor([[0, 0], [1, -1]])
    target = _target(owner, [1, 0])
    mask_logits = torch.tensor(
        [[[9.0, 9.0], [0.0, 0.0]], [[0.0, 0.0], [9.0, 0.0]], [[0.0, 0.0], [0.0, 5.0]]]
    )[None]
    class_logits = torch.tensor([[0.0, 4.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]])[None]
    out = {"class_logits": class_logits, "mask_logits": mask_logits, "pixel_feature": torch.zeros(1, 2, 2, 2)}
    crit = Criterion(LossConfig(), K)
    slot = crit.build_slot_targets(out, [target])
    assert slot.classes.tolist() == [[1, 0, K]]
    probs = mask_logits[0].flatten(1).softmax(0).numpy().astype(np.float64)
    v = np.array([1, 1, 1, 0.0])
    m = probs * v
    dice0 = (m[0] * [1, 1, 0, 0]).sum() / ((m[0].sum() + 2) / 2 + 1e-5)
    dice1 = (m[1] * [0, 0, 1, 0]).sum() / ((m[1].sum() + 1) / 2 + 1e-5)
    void_ratio2 = probs[2, 3] / (probs[2].sum() + 1e-5)
    np.testing.assert_allclose(
        slot.class_weights[0].numpy(), [0.75 * dice0, 0.75 * dice1, 0.25 * void_ratio2], rtol=1e-5
    )
    cls_p = class_logits[0].softmax(-1).numpy()
    np.testing.assert_allclose(slot.dice_weights[0].numpy(), [cls_p[0, 1], cls_p[1, 0], 0.0], rtol=1e-5)
    # the criterion's class / dice losses are those functions applied to these slot targets
    losses = crit(out, [target])
    flat = mask_logits.flatten(2)
    assert losses["loss_pq_class"].item() == pytest.approx(
        pq_class_loss(class_logits, slot.classes, slot.class_weights).item(), rel=1e-6
    )
    assert losses["loss_pq_dice"].item() == pytest.approx(
        pq_dice_loss(flat, slot.masks, slot.valid, slot.dice_weights, 0.75, 1.0).item(), rel=1e-6
    )


def test_aux_outputs_share_the_final_matching() -> None:
    owner = torch.tensor([[0, 0, 1], [0, 1, 1]])
    target = _target(owner, [0, 1])
    good = torch.stack([(owner == 0).float() * 8, (owner == 1).float() * 8])[None]
    cls = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])[None]
    feat = torch.nn.functional.normalize(torch.ones(1, 2, 2, 3), dim=1)
    final = {"class_logits": cls, "mask_logits": good, "pixel_feature": feat}
    aux = {"class_logits": cls.flip(1), "mask_logits": good.flip(1), "pixel_feature": feat}  # slots swapped
    outputs = {**final, "aux_outputs": [aux]}
    shared = Criterion(LossConfig(insdis_weight=0.0), 2)(outputs, [target])
    own = Criterion(LossConfig(insdis_weight=0.0, share_final_matching=False), 2)(outputs, [target])
    # with the final matching, the swapped aux output is wrong; matched on its own it is as good as final
    assert shared["loss_pq_dice_aux0"].item() > 10 * shared["loss_pq_dice"].item()
    assert shared["loss_mask_id_aux0"].item() > 10 * shared["loss_mask_id"].item()
    assert own["loss_pq_dice_aux0"].item() == pytest.approx(own["loss_pq_dice"].item(), rel=1e-5)
    assert own["loss_mask_id_aux0"].item() == pytest.approx(own["loss_mask_id"].item(), rel=1e-5)


def test_fp32_under_autocast() -> None:
    outputs = _outputs(3, num_aux=1)
    half = {k: v.detach().to(torch.bfloat16) for k, v in outputs.items() if k != "aux_outputs"}
    half["aux_outputs"] = [{k: v.detach().to(torch.bfloat16) for k, v in outputs["aux_outputs"][0].items()}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = Criterion(SMALL, K)(half, _targets(3))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_bad_targets_are_named() -> None:
    outputs = _outputs(4)
    wrong = [_target(torch.zeros(H + 1, W, dtype=torch.int64), [0]), _targets(4)[0]]
    with pytest.raises(ValueError, match=r"targets\[0\].*output-stride grid"):
        Criterion(SMALL, K)(outputs, wrong)
    with pytest.raises(ValueError, match="2 predictions"):
        Criterion(SMALL, K)(outputs, _targets(4)[:1])


def test_build_criterion_from_model_config() -> None:
    cfg = preset("tiny")
    criterion = build_criterion(cfg)
    assert criterion.num_classes == cfg.num_classes
    assert criterion.weight_of("loss_insdis_aux5") == cfg.loss.insdis_weight


def test_semantic_loss_on_a_coarser_strided_grid() -> None:
    # targets on 5x5, semantic logits on 3x3 (stride 2, corners aligned): the GT is subsampled [::2, ::2]
    g = torch.Generator().manual_seed(5)
    owner = torch.randint(0, 3, (5, 5), generator=g)
    target = _target(owner, [0, 1, 2])
    out = {
        "class_logits": torch.randn(1, N, K + 1, generator=g),
        "mask_logits": torch.randn(1, N, 5, 5, generator=g),
        "pixel_feature": torch.nn.functional.normalize(torch.randn(1, D, 5, 5, generator=g), dim=1),
        "semantic_logits": torch.randn(1, K + 1, 3, 3, generator=g),
    }
    cfg = LossConfig(semantic_sample_k=0)
    got = Criterion(cfg, K)(out, [target])["loss_semantic"]
    sub = target["semantic"][::2, ::2].flatten()
    expected = torch.nn.functional.cross_entropy(out["semantic_logits"].flatten(2)[0].T, sub)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    out["semantic_logits"] = torch.randn(1, K + 1, 4, 4, generator=g)
    with pytest.raises(ValueError, match="not a strided subgrid"):
        Criterion(cfg, K)(out, [target])


def test_loss_config_defaults_and_validation() -> None:
    cfg = LossConfig()
    assert (cfg.pq_class_weight, cfg.pq_dice_weight, cfg.mask_id_weight) == (3.0, 3.0, 0.3)
    assert (cfg.insdis_weight, cfg.semantic_weight, cfg.pq_alpha) == (1.0, 1.0, 0.75)
    assert (cfg.insdis_sample_k, cfg.insdis_sample_temperature, cfg.insdis_temperature) == (4096, 1.5, 0.3)
    assert (cfg.semantic_sample_k, cfg.semantic_sample_temperature, cfg.share_final_matching) == (
        4096,
        2.0,
        True,
    )
    for field, bad in [
        ("pq_alpha", 1.5),
        ("mask_id_weight", -1.0),
        ("insdis_sample_k", 1),
        ("insdis_temperature", 0),
    ]:
        with pytest.raises(ValueError, match=rf"loss\.{field}"):
            LossConfig(**{field: bad})
