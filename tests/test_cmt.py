"""``decoder.assignment = "cmt"`` (kmax_model.cmt, CMT-DeepLab as reconstructed): every on/off combination of
its components on the tiny preset (shapes, a gradient for every parameter, no module of a switched-off
component), each update against an explicit loop, the mask-approximation loss by hand, the fp32 island
under bf16 autocast, the all-off layer equal to the ``cross_attention`` mode, the other modes untouched."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kmax_model import apply_overrides, build_model, preset
from kmax_model.clustering import coordinate_grid
from kmax_model.cmt import (
    CMTBranches,
    ReferenceMask,
    centre_update_sum,
    pull_to_pixels,
    residual_logits,
    soft_assignment,
)
from kmax_model.config import (
    ASSIGNMENT_MODES,
    CONTROLLED_ASSIGNMENT_MODES,
    PRESET_NAMES,
    CMTConfig,
    TransformerDecoderConfig,
)
from kmax_model.config_objective import LossConfig
from kmax_model.config_utils import ConfigError
from kmax_model.criterion import Criterion
from kmax_model.layers import make_norm_factory
from kmax_model.losses import mask_approximation_loss
from kmax_model.targets import IGNORE_INDEX, Target
from tests.test_cross_attention import randomise_norms

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SWITCHES = ("centre_update", "residual_assignment", "pixel_update", "reference_mask")
COMBINATIONS = list(itertools.product([False, True], repeat=len(SWITCHES)))
IMAGE = (2, 3, 33, 49)  # output grid 9 x 13; layer grids 2 x 2, 3 x 4, 5 x 7
B, D, CP, N, H, W = 2, 8, 6, 5, 3, 4


def _tiny(**switches) -> object:
    overrides = {"decoder.assignment": "cmt", **{f"decoder.cmt.{k}": v for k, v in switches.items()}}
    return apply_overrides(preset("tiny"), overrides)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------ the whole model


@pytest.mark.parametrize("switches", COMBINATIONS, ids=lambda c: "".join("01"[v] for v in c))
def test_every_combination_shapes_gradients_and_no_unused_module(switches):
    on = dict(zip(SWITCHES, switches))
    torch.manual_seed(0)
    cfg = _tiny(**on)
    model = build_model(cfg).train()
    out = model(torch.randn(*IMAGE), return_assignments=True)
    n, k = cfg.decoder.num_clusters, cfg.num_classes
    assert tuple(out["class_logits"].shape) == (2, n, k + 1)
    assert tuple(out["mask_logits"].shape) == (2, n, 9, 13)
    tensors = [out["semantic_logits"], out["class_logits"], out["mask_logits"], out["pixel_feature"]]
    for aux in out["aux_outputs"]:
        assert ("reference_logits" in aux) == on["reference_mask"]
        assert tuple(aux["mask_logits"].shape) == (2, n, 9, 13)
        if on["reference_mask"]:
            assert tuple(aux["reference_logits"].shape) == (2, n, 9, 13)
            assert aux["reference_logits"].dtype == torch.float32
        tensors += list(aux.values())
    assert all(torch.isfinite(t).all() for t in tensors)
    sum(t.float().square().mean() for t in tensors).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for index, layer in enumerate(model.transformer_decoder.layers):
        last_of_stride = index % 2 == 1  # tiny: 2 layers per stride
        cmt = layer.cmt
        assert layer.pixel_value is None and layer.cross_attention is None and layer.pixel_update is None
        assert (cmt.update_proj is not None) == on["centre_update"] == (cmt.update_norm is not None)
        assert cmt.value is None  # share_value: the clustering branch reads the cross-attention's V
        assert (cmt.reference is not None) == on["reference_mask"]
        assert (cmt.pixel_value is not None) == (on["pixel_update"] and not last_of_stride)
        assert (cmt.pixel_coord is not None) == (
            on["pixel_update"] and on["reference_mask"] and not last_of_stride
        )


@pytest.mark.parametrize(
    "overrides",
    [
        {"decoder.cmt.share_value": False},
        {"decoder.cmt.centre_update_norm": "mass"},
        {"decoder.cmt.detach_assignment": True},
        {"decoder.cmt.pixel_update_coords": False},
        {"decoder.cmt.assignment_temperature": 0.5, "decoder.cmt.reference_dim": 8},
        {"decoder.coord_conv": True},
    ],
    ids=lambda o: ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in o.items()),
)
def test_open_choices_train_every_parameter(overrides):
    """Each open choice away from its default still builds, runs and gives every parameter a gradient."""
    torch.manual_seed(0)
    model = build_model(apply_overrides(_tiny(), overrides)).train()
    layer = model.transformer_decoder.layers[0].cmt
    assert (layer.value is not None) == (overrides.get("decoder.cmt.share_value") is False)
    assert (layer.pixel_coord is None) == (overrides.get("decoder.cmt.pixel_update_coords") is False)
    out = model(torch.randn(*IMAGE))
    tensors = [out[key] for key in ("mask_logits", "class_logits", "pixel_feature", "semantic_logits")] + [
        t for aux in out["aux_outputs"] for t in aux.values()
    ]
    sum(t.float().square().mean() for t in tensors).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_parameter_count_is_the_sum_of_the_components():
    """Per layer against argmax: the cross-attention's Q and K, its second output path (BN + conv + BN)
    when the clustering branch keeps kMaX's; the reference mask; the pixel update where it exists."""
    cfg = preset("tiny")
    d, kd, r = cfg.decoder.hidden_dim, cfg.decoder.key_dim, CMTConfig().reference_dim
    layers = sum(cfg.decoder.blocks_per_stride)
    with torch.device("meta"):
        argmax = _count(build_model(cfg))
        full = build_model(_tiny())
        bare = _count(build_model(_tiny(**dict.fromkeys(SWITCHES, False))))
    pixel_channels = [layer.cmt.pixel_norm.num_features for layer in full.transformer_decoder.layers[::2]]
    attention = 2 * (d * kd + 2 * kd) + d * d + 4 * d
    reference = (2 * r + r) + (r * r + r) + d * r + 2
    pixel = sum(cp * (d + 2 + 2) for cp in pixel_channels)
    assert _count(full) - argmax == layers * (attention + reference) + pixel
    # all off = the cross_attention mode's parameters (test_cross_attention: its Q and K over argmax)
    assert bare - argmax == layers * 2 * (d * kd + 2 * kd)


def test_all_components_off_equals_the_cross_attention_mode():
    torch.manual_seed(0)
    cross = randomise_norms(
        build_model(apply_overrides(preset("tiny"), ["decoder.assignment=cross_attention"]))
    )
    cmt = build_model(_tiny(**dict.fromkeys(SWITCHES, False)))
    state = {
        key.replace(".cross_attention.", ".cmt.cross_attention."): value
        for key, value in cross.state_dict().items()
    }
    cmt.load_state_dict(state, strict=True)
    images = torch.randn(*IMAGE)
    for training in (False, True):
        cross.train(training)
        cmt.train(training)
        a, b = cross(images, return_assignments=True), cmt(images, return_assignments=True)
        assert torch.equal(a["mask_logits"], b["mask_logits"]) and torch.equal(
            a["class_logits"], b["class_logits"]
        )
        for x, y in zip(a["aux_outputs"] + a["assignments"], b["aux_outputs"] + b["assignments"]):
            if isinstance(x, dict):
                assert all(torch.equal(x[key], y[key]) for key in x) and set(x) == set(y)
            else:
                assert torch.equal(x, y)


def test_decoder_carries_the_logits_across_layers_and_strides():
    """Each layer's supervised logits are its predictor's plus the previous layer's carried ones, resized."""
    torch.manual_seed(0)
    model = build_model(_tiny(reference_mask=False)).eval()
    layers = model.transformer_decoder.layers
    predicted = []
    for layer in layers:
        layer.predictor.register_forward_hook(lambda mod, args, out: predicted.append(out["mask_logits"]))
    maps = model.pixel_decoder(model.backbone(torch.randn(*IMAGE)))[:3]
    with torch.no_grad():
        _, _, aux = model.transformer_decoder(maps)
    carried = None
    for m, a in zip(predicted, aux):
        expected = m if carried is None else m + _bilinear_loop(carried, m.shape[-2:])
        torch.testing.assert_close(a["mask_logits"], expected)
        carried = a["mask_logits"]
        assert "_carried_logits" not in a
    assert predicted[1].shape == predicted[0].shape and predicted[2].shape != predicted[1].shape


# --------------------------------------------------------------------------- each update, by explicit loop


def _bilinear_loop(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with align_corners=True, written out per output pixel."""
    h, w = x.shape[-2:]
    out = torch.zeros(*x.shape[:-2], *size)
    for i in range(size[0]):
        for j in range(size[1]):
            y = i * (h - 1) / (size[0] - 1) if size[0] > 1 else 0.0
            xx = j * (w - 1) / (size[1] - 1) if size[1] > 1 else 0.0
            y0, x0 = min(int(math.floor(y)), h - 1), min(int(math.floor(xx)), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, xx - x0
            out[..., i, j] = (
                x[..., y0, x0] * (1 - fy) * (1 - fx)
                + x[..., y0, x1] * (1 - fy) * fx
                + x[..., y1, x0] * fy * (1 - fx)
                + x[..., y1, x1] * fy * fx
            )
    return out


def test_residual_path_is_the_sum_with_the_previous_logits_resized():
    g = torch.Generator().manual_seed(0)
    logits, previous = torch.randn(B, N, 5, 7, generator=g), torch.randn(B, N, 3, 4, generator=g)
    torch.testing.assert_close(residual_logits(logits, previous), logits + _bilinear_loop(previous, (5, 7)))
    same = torch.randn(B, N, 5, 7, generator=g)
    assert torch.equal(residual_logits(logits, same), logits + same)  # same stride: no resize
    assert torch.equal(residual_logits(logits, None), logits)


def test_soft_assignment_is_a_softmax_over_the_clusters():
    logits = torch.randn(B, N, H, W, generator=torch.Generator().manual_seed(1), requires_grad=True)
    a = soft_assignment(logits, 2.0, detach=False)
    assert a.shape == (B, N, H * W)
    torch.testing.assert_close(a.sum(1), torch.ones(B, H * W))
    for b, n, p in itertools.product(range(B), range(N), range(H * W)):
        column = logits.flatten(2)[b, :, p] / 2.0
        torch.testing.assert_close(a[b, n, p], torch.exp(column[n]) / torch.exp(column).sum())
    assert a.requires_grad and not soft_assignment(logits, 1.0, detach=True).requires_grad


def test_centre_update_equals_a_loop():
    g = torch.Generator().manual_seed(2)
    a = torch.softmax(torch.randn(B, N, H * W, generator=g), dim=1)
    v = torch.randn(B, D, H * W, generator=g)
    loop = torch.zeros(B, N, D)
    for b, n, c in itertools.product(range(B), range(N), range(D)):
        loop[b, n, c] = sum(a[b, n, p] * v[b, c, p] for p in range(H * W))
    torch.testing.assert_close(centre_update_sum(a, v, "sum"), loop)
    mass = a.sum(-1, keepdim=True)
    torch.testing.assert_close(centre_update_sum(a, v, "mass"), loop / (mass + 1e-6))


def test_pixel_update_equals_a_loop():
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(B, N, H * W, generator=g), dim=1)
    vc = torch.randn(B, CP, N, generator=g)
    loop = torch.zeros(B, CP, H * W)
    for b, c, p in itertools.product(range(B), range(CP), range(H * W)):
        loop[b, c, p] = sum(a[b, n, p] * vc[b, c, n] for n in range(N))
    torch.testing.assert_close(pull_to_pixels(a, vc), loop)

    # the module: F + BN_g0(A^T conv1d(C3) + conv1x1(c)), norms randomised, eval mode
    cfg = TransformerDecoderConfig(hidden_dim=D, key_dim=4, num_heads=2, drop_path_rate=0.0)
    torch.manual_seed(0)
    branches = randomise_norms(CMTBranches(CP, cfg, make_norm_factory("bn"), updates_pixels=True)).eval()
    pixel, centres = torch.randn(B, CP, H, W, generator=g), torch.randn(B, D, N, generator=g)
    step = branches(
        torch.randn(B, D, N, generator=g), torch.randn(B, D, H, W, generator=g), torch.randn(B, N, H, W)
    )
    with torch.no_grad():
        out = branches.update_pixels(pixel, step, centres)
        coords = coordinate_grid(H, W)[0].flatten(1)  # 2 x L
        wv, wc = branches.pixel_value.weight[..., 0], branches.pixel_coord.weight[..., 0, 0]  # CP x D, CP x 2
        bn = branches.pixel_norm
        expected = torch.zeros(B, CP, H * W)
        for b, c, p in itertools.product(range(B), range(CP), range(H * W)):
            pulled = sum(step.assignment[b, n, p] * (wv[c] @ centres[b, :, n]) for n in range(N))
            pulled = pulled + wc[c] @ coords[:, p]
            norm = (pulled - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + bn.eps)
            expected[b, c, p] = pixel.flatten(2)[b, c, p] + bn.weight[c] * norm + bn.bias[c]
    torch.testing.assert_close(out.flatten(2), expected, rtol=1e-5, atol=1e-5)


def test_coordinate_grid_and_reference_mask_values():
    grid = coordinate_grid(3, 4)
    assert grid.shape == (1, 2, 3, 4)
    for i, j in itertools.product(range(3), range(4)):
        assert grid[0, 0, i, j].item() == pytest.approx((2 * j + 1) / 4 - 1)  # x, pixel centres in (-1, 1)
        assert grid[0, 1, i, j].item() == pytest.approx((2 * i + 1) / 3 - 1)  # y
    torch.manual_seed(0)
    ref = randomise_norms(ReferenceMask(D, CMTConfig(reference_dim=4), make_norm_factory("bn"))).eval()
    centres = torch.randn(B, D, N)
    with torch.no_grad():
        logits = ref(centres, grid)
        embed = ref.coord_embed(grid)[0]  # r x H x W
        kernel = ref.kernel.weight[..., 0] @ centres  # B x r x N
        bn = ref.logit_norm
        for b, n, i, j in itertools.product(range(B), range(N), range(3), range(4)):
            dot = sum(kernel[b, c, n] * embed[c, i, j] for c in range(4))
            value = (dot - bn.running_mean[0]) / torch.sqrt(bn.running_var[0] + bn.eps) * bn.weight[
                0
            ] + bn.bias[0]
            torch.testing.assert_close(logits[b, n, i, j], value)


# ------------------------------------------------------------------------------ mask-approximation loss


def test_mask_approximation_loss_by_hand():
    """Image 0: slot 0 matched to y = [1, 1, 0, void], logits [ln 3, 0, 0, 9] -> s = [3/4, 1/2, 1/2];
    dice = 1 - (2 * 5/4 + 1) / (7/4 + 2 + 1) = 5/19; BCE = (ln 4/3 + ln 2 + ln 2) / 3 = ln(16/3) / 3.
    Slot 1 is unmatched (not counted). Image 1 has no matched slot: 0, and the batch mean halves."""
    logits = torch.tensor([[[math.log(3.0), 0.0, 0.0, 9.0], [5.0, -5.0, 5.0, 5.0]]]).repeat(2, 1, 1)
    targets = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]).repeat(2, 1, 1)
    valid = torch.tensor([[True, True, True, False]]).repeat(2, 1)
    matched = torch.tensor([[True, False], [False, False]])
    dice, bce = 5.0 / 19.0, math.log(16.0 / 3.0) / 3.0
    for terms, value in (("dice", dice), ("bce", bce), ("dice_bce", dice + bce)):
        loss = mask_approximation_loss(logits, targets, valid, matched, terms, smooth=1.0)
        assert loss.item() == pytest.approx(value / 2, rel=1e-6), terms
    with pytest.raises(ValueError, match="mask_approx_terms"):
        mask_approximation_loss(logits, targets, valid, matched, "focal")


def _target(owner: torch.Tensor, labels: list[int]) -> Target:
    masks = torch.stack([(owner == j).float() for j in range(len(labels))])
    valid = owner >= 0
    semantic = torch.where(
        valid, torch.tensor(labels)[owner.clamp(min=0)], torch.full_like(owner, IGNORE_INDEX)
    )
    area = (masks * masks.sum((1, 2), keepdim=True)).sum(0)
    return Target(masks=masks, labels=torch.tensor(labels), valid=valid, semantic=semantic, area=area)


def test_criterion_matches_reference_masks_like_the_mask_losses_in_fp32():
    g = torch.Generator().manual_seed(4)
    k, n, h, w = 3, 4, 5, 6

    def output(reference: bool) -> dict:
        out = {
            "class_logits": torch.randn(2, n, k + 1, generator=g),
            "mask_logits": 3 * torch.randn(2, n, h, w, generator=g),
            "pixel_feature": torch.nn.functional.normalize(torch.randn(2, 8, h, w, generator=g), dim=1),
        }
        if reference:
            out["reference_logits"] = torch.randn(2, n, h, w, generator=g).bfloat16().requires_grad_()
        return out

    outputs = {**output(False), "aux_outputs": [output(True), output(False)]}
    owner = torch.randint(-1, 3, (h, w), generator=g)
    targets = [_target(owner, [0, 2, 1]), _target(torch.roll(owner, 1, 0), [1, 1, 2])]
    criterion = Criterion(_small_loss(), k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = criterion(outputs, targets, torch.Generator().manual_seed(0))
    assert "loss_mask_approx_aux0" in losses and not any(
        key.startswith("loss_mask_approx_aux1") for key in losses
    )
    assert "loss_mask_approx" not in losses and losses["loss_mask_approx_aux0"].dtype == torch.float32
    assert criterion.weight_of("loss_mask_approx_aux0") == 1.0
    slot = criterion.build_slot_targets(
        {key: outputs[key] for key in ("class_logits", "mask_logits")}, targets
    )
    expected = mask_approximation_loss(
        outputs["aux_outputs"][0]["reference_logits"].float().flatten(2),
        slot.masks,
        slot.valid,
        slot.classes != k,
    )
    torch.testing.assert_close(losses["loss_mask_approx_aux0"], expected)
    criterion.total(losses).backward()
    assert outputs["aux_outputs"][0]["reference_logits"].grad is not None
    off = Criterion(_small_loss(mask_approx_weight=0.0), k)(outputs, targets, torch.Generator())
    assert not any(key.startswith("loss_mask_approx") for key in off)


def _small_loss(**changes) -> LossConfig:
    """The default objective with few sampled pixels (16) for the two sampled losses."""
    return LossConfig(insdis_sample_k=16, semantic_sample_k=16, **changes)


# ---------------------------------------------------------------------------------- precision and modes


def test_assignment_and_updates_are_fp32_under_bf16_autocast():
    cfg = TransformerDecoderConfig(hidden_dim=D, key_dim=4, num_heads=2, drop_path_rate=0.0)
    torch.manual_seed(0)
    branches = CMTBranches(CP, cfg, make_norm_factory("bn"), updates_pixels=True).train()
    g = torch.Generator().manual_seed(5)
    cb, p = torch.randn(B, D, N, generator=g).bfloat16(), torch.randn(B, D, H, W, generator=g).bfloat16()
    masks, previous = torch.randn(B, N, H, W, generator=g).bfloat16(), torch.randn(B, N, 2, 2, generator=g)
    pixel = torch.randn(B, CP, H, W, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert branches.cross_attention.query(cb).dtype == torch.bfloat16  # autocast is really on
        step = branches(cb, p, masks, previous)
        out = branches.update_pixels(pixel, step, cb)
        values = branches.cross_attention.value(p).flatten(2)
        update = centre_update_sum(step.assignment, values, "sum")
        pulled = pull_to_pixels(step.assignment, cb)
    for tensor in (
        step.logits,
        step.assignment_logits,
        step.assignment,
        step.reference_logits,
        update,
        pulled,
    ):
        assert tensor.dtype == torch.float32
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    # the same bf16 inputs without autocast, in fp32: identical, so nothing inside ran in bf16
    assert torch.equal(update, centre_update_sum(step.assignment, values.float(), "sum"))
    assert torch.equal(pulled, pull_to_pixels(step.assignment, cb.float()))
    assert torch.equal(
        step.logits,
        masks.float()
        + torch.nn.functional.interpolate(previous, size=(H, W), mode="bilinear", align_corners=True),
    )


def test_tiny_cmt_model_runs_under_bf16_autocast():
    model = build_model(_tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 33, 49))
    loss = (
        out["mask_logits"].float().square().mean() + out["aux_outputs"][0]["reference_logits"].square().mean()
    )
    loss.backward()
    assert torch.isfinite(model.transformer_decoder.cluster_centers.grad).all()


@pytest.mark.parametrize("mode", [m for m in ASSIGNMENT_MODES if m != "cmt"])
def test_other_modes_build_no_cmt_part(mode):
    model = build_model(apply_overrides(preset("tiny"), {"decoder.assignment": mode}))
    assert all(layer.cmt is None for layer in model.transformer_decoder.layers)
    assert not any(".cmt." in name for name, _ in model.named_parameters())
    out = model(torch.randn(1, 3, 33, 33))
    assert all("reference_logits" not in aux for aux in out["aux_outputs"])


def test_config_preset_and_validation():
    assert "cmt" in ASSIGNMENT_MODES and "cmt" not in CONTROLLED_ASSIGNMENT_MODES
    assert "cmt_resnet50_coco" in PRESET_NAMES
    cfg, base = preset("cmt_resnet50_coco"), preset("resnet50_coco")
    assert cfg.decoder.assignment == "cmt" and cfg.decoder.cmt == CMTConfig()
    assert all(getattr(cfg.decoder.cmt, s) for s in SWITCHES)
    assert (cfg.decoder.num_clusters, cfg.decoder.hidden_dim, cfg.decoder.num_heads) == (128, 256, 8)
    assert cfg.backbone == base.backbone and cfg.pixel_decoder == base.pixel_decoder and cfg.loss == base.loss
    assert preset("tiny").decoder.cmt == CMTConfig()  # present, ignored outside cmt mode
    with pytest.raises(ConfigError, match=r"^decoder\.cmt\.reference_dim must be > 0"):
        apply_overrides(preset("tiny"), ["decoder.cmt.reference_dim=0"])
    with pytest.raises(ConfigError, match=r"^decoder\.cmt\.centre_update_norm: 'mean' is not one of"):
        apply_overrides(preset("tiny"), ["decoder.cmt.centre_update_norm=mean"])
    with pytest.raises(ConfigError, match=r"loss\.mask_approx_terms"):
        apply_overrides(preset("tiny"), ["loss.mask_approx_terms=focal"])


def test_component_studies_build_valid_configs():
    from ablations.studies import CMT_SWITCHES
    from pipeline.config import ExperimentConfig
    from pipeline.sweep.study import resolve_study

    components = resolve_study("cmt_components", seeds=2)
    assert len(components.variants()) == 16 and len(components.trials()) == 32
    assert components.reference_point() == dict.fromkeys(CMT_SWITCHES, True)
    for trial in components.trials() + resolve_study("cmt_mask_approx").trials():
        cfg = apply_overrides(ExperimentConfig(), trial)
        assert cfg.model.decoder.assignment == "cmt"
        for path, value in trial.items():
            node = cfg
            for part in path.split("."):
                node = getattr(node, part)
            assert node == value, path


def test_training_steps_lower_the_mask_approximation_loss():
    """Model -> criterion -> backward end to end: every layer's reference mask gets its loss term, all
    finite, and a few Adam steps on the total lower the summed mask-approximation loss."""
    torch.manual_seed(0)
    cfg = _tiny()
    model = build_model(cfg).train()
    criterion = Criterion(_small_loss(), cfg.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, 33, 49, generator=torch.Generator().manual_seed(6))
    owner = torch.zeros(9, 13, dtype=torch.int64)
    owner[2:7, 3:9], owner[:, 10:] = 1, 2
    targets = [_target(owner, [0, 3, 5]), _target(owner.flip(1), [1, 3, 4])]
    history = []
    for _ in range(6):
        losses = criterion(model(images), targets, torch.Generator().manual_seed(0))
        approx = [key for key in losses if key.startswith("loss_mask_approx")]
        assert approx == [f"loss_mask_approx_aux{i}" for i in range(sum(cfg.decoder.blocks_per_stride))]
        assert all(torch.isfinite(value) for value in losses.values())
        history.append(sum(losses[key].item() for key in approx))
        optimizer.zero_grad()
        criterion.total(losses).backward()
        optimizer.step()
    assert history[-1] < history[0]
