"""`kmax_model.convert_kmax_deeplab`: official bytedance/kmax-deeplab state dicts into our models.

Their layouts come from ../shared/fixtures/kmax_official_keys (key -> shape of ``model.state_dict()`` of
the official models at f8e1d046); each test fills one with random values. The numeric checks compare our
converted model, module by module on the same inputs (teacher forcing, so rounding cannot grow through
the random network), with `_Reference`: a functional forward written here from the maths of their code,
addressed by THEIR key names. A key mapped to the wrong module of the same shape (two BNs of a layer,
the height and width axes, q and k position tables, class and mask embeddings, ...) changes the numbers.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from kmax_model import ConversionError, build_model, convert_kmax_deeplab, preset
from tests.conftest import shared_path

FIXTURES = {
    "resnet50_coco": "coco_r50.json",
    "convnext_tiny_coco": "coco_convnext_tiny.json",
    "resnet50_cityscapes": "cityscapes_r50.json",
}
SIZES = {"resnet50_coco": (65, 65), "convnext_tiny_coco": (65, 97), "resnet50_cityscapes": (65, 129)}
BN_EPS = 1e-3  # their get_norm("syncbn"): SyncBatchNorm(eps=1e-3, momentum=0.01), backbone included
LN_EPS = 1e-6
MAX_SPAN = 255
HEADS = 8
VOID_PRIOR = 0.9
PD = "sem_seg_head.pixel_decoder."
TD = "sem_seg_head.predictor."
SEM = TD + "_auxiliary_semantic_predictor."
CLASS_BIAS = TD + "_predcitor._transformer_class_head.conv.bias"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def official_fixture(name: str) -> dict:
    return json.loads(shared_path("fixtures", "kmax_official_keys", FIXTURES[name]).read_text())


def random_official_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Their state dict with values that keep a random network's activations O(1): conv/linear weights
    std fan_in^-1/2, norm scales near 1, small shifts, running variances in [0.5, 1.5], position tables and
    cluster centres std 1 (their init)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bias")):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            out[key] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            unit = "_rpe." in key or "_cluster_centers" in key
            out[key] = torch.randn(shape, generator=g) * (1.0 if unit else math.prod(shape[1:]) ** -0.5)
    return out


def meta_official_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {k: torch.empty(s) for k, s in shapes.items()}


# ------------------------------------------------------------------------- reference forward, their names


def bn(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    """Eval-mode BatchNorm over dim 1 with ``p + {weight, bias, running_mean, running_var}``."""
    return F.batch_norm(
        x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False, 0.0, BN_EPS
    )


def conv_bn(x, sd, p, act=None, stride=1, padding=0, groups=1, dilation=1):
    """Their ``ConvBN`` (``p.conv.weight`` [+ ``p.conv.bias``], ``p.norm.*`` when present) or a detectron2
    ``Conv2d`` with norm (``p.weight``, ``p.norm.*``), then the activation."""
    w = sd[p + "conv.weight"] if p + "conv.weight" in sd else sd[p + "weight"]
    conv = F.conv1d if w.dim() == 3 else F.conv2d
    x = conv(x, w, sd.get(p + "conv.bias"), stride, padding, dilation, groups)
    if p + "norm.weight" in sd:
        x = bn(x, sd, p + "norm.")
    if act == "gelu":
        return F.gelu(x)
    return F.relu(x) if act == "relu" else x


def layer_norm_2d(x, sd, p):
    c = x.shape[1]
    return F.layer_norm(x.permute(0, 2, 3, 1), (c,), sd[p + "weight"], sd[p + "bias"], LN_EPS).permute(
        0, 3, 1, 2
    )


def ref_resnet(x, sd):
    """detectron2 ResNet-50 (stride in the 3x3, ReLU, max-pool stem) -> stem, res2..res5."""
    x = F.max_pool2d(conv_bn(x, sd, "backbone.stem.conv1.", "relu", stride=2, padding=3), 3, 2, 1)
    feats = {"stem": x}
    for s, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            p = f"backbone.res{s}.{b}."
            stride = 2 if b == 0 and s > 2 else 1
            h = conv_bn(conv_bn(x, sd, p + "conv1.", "relu"), sd, p + "conv2.", "relu", stride, 1)
            short = conv_bn(x, sd, p + "shortcut.", stride=stride) if p + "shortcut.weight" in sd else x
            x = F.relu(conv_bn(h, sd, p + "conv3.") + short)
        feats[f"res{s}"] = x
    return feats


def ref_convnext(x, sd, depths=(3, 3, 9, 3)):
    """Their ConvNeXt forward_features: zero pad (1, 2) / (0, 1) BEFORE each downsample layer."""
    feats = {}
    for i, depth in enumerate(depths):
        p = f"backbone.downsample_layers.{i}."
        if i == 0:
            x = F.conv2d(F.pad(x, (1, 2, 1, 2)), sd[p + "0.weight"], sd[p + "0.bias"], stride=4)
            x = feats["stem"] = layer_norm_2d(x, sd, p + "1.")
        else:
            x = layer_norm_2d(F.pad(x, (0, 1, 0, 1)), sd, p + "0.")
            x = F.conv2d(x, sd[p + "1.weight"], sd[p + "1.bias"], stride=2)
        for j in range(depth):
            q, c = f"backbone.stages.{i}.{j}.", x.shape[1]
            y = F.conv2d(x, sd[q + "dwconv.weight"], sd[q + "dwconv.bias"], padding=3, groups=c)
            y = F.layer_norm(y.permute(0, 2, 3, 1), (c,), sd[q + "norm.weight"], sd[q + "norm.bias"], LN_EPS)
            y = F.gelu(F.linear(y, sd[q + "pwconv1.weight"], sd[q + "pwconv1.bias"]))
            y = F.linear(y, sd[q + "pwconv2.weight"], sd[q + "pwconv2.bias"])
            x = x + (sd[q + "gamma"] * y).permute(0, 3, 1, 2)
        feats[f"res{i + 2}"] = x
    return feats


def ref_axial_1d(x, sd, p):
    """Their AxialAttention along the last axis: BN'd q.k + q.r_q + k.r_k (per term and head), softmax over
    keys, BN'd w@v + w@r_v; tables indexed by key - query + MAX_SPAN - 1."""
    n, _, length = x.shape
    dk = HEADS * sd[p + "_query_rpe._embeddings.weight"].shape[1]
    dv = HEADS * sd[p + "_value_rpe._embeddings.weight"].shape[1]
    qkv = bn(F.conv1d(x, sd[p + "qkv_transform.conv.weight"]), sd, p + "_batch_norm_qkv.")
    q, k, v = (t.reshape(n, HEADS, -1, length) for t in torch.split(qkv, [dk, dk, dv], dim=1))
    pos = torch.arange(length)
    dist = pos[None, :] - pos[:, None] + MAX_SPAN - 1  # [query, key]
    rq, rk, rv = (sd[p + f"_{t}_rpe._embeddings.weight"][dist] for t in ("query", "key", "value"))
    terms = [
        torch.einsum("bhdl,bhdm->bhlm", q, k),
        torch.einsum("bhdl,lmd->bhlm", q, rq),
        torch.einsum("bhdm,lmd->bhlm", k, rk),
    ]
    sim = bn(torch.cat(terms, 1), sd, p + "_batch_norm_similarity.").reshape(n, 3, HEADS, length, length)
    w = sim.sum(1).softmax(-1)
    out = torch.cat([torch.einsum("bhlm,bhdm->bhdl", w, v), torch.einsum("bhlm,lmd->bhdl", w, rv)], 1)
    out = bn(out.reshape(n, 2 * dv, length), sd, p + "_batch_norm_retrieved_output.")
    return out.reshape(n, 2, dv, length).sum(1)


def ref_axial_2d(x, sd, p):
    n, c, h, w = x.shape
    y = ref_axial_1d(x.permute(0, 3, 1, 2).reshape(n * w, c, h), sd, p + "_height_axis.")
    dv = y.shape[1]
    y = ref_axial_1d(y.reshape(n, w, dv, h).permute(0, 3, 2, 1).reshape(n * h, dv, w), sd, p + "_width_axis.")
    return y.reshape(n, h, dv, w).permute(0, 2, 1, 3)


def ref_block(x, sd, p):
    x = F.gelu(x)
    short = conv_bn(x, sd, p + "_shortcut.") if p + "_shortcut.conv.weight" in sd else x
    h = conv_bn(x, sd, p + "_conv1_bn_act.", "gelu")
    if p + "_conv2_bn_act.conv.weight" in sd:
        h = conv_bn(h, sd, p + "_conv2_bn_act.", "gelu", padding=1)
    else:
        h = F.gelu(ref_axial_2d(h, sd, p + "_attention."))
    return conv_bn(h, sd, p + "_conv3_bn.") + short


def ref_stage_input(sd, i, feature, previous):
    """Pixel-decoder stage i's input from their backbone feature (and the previous stage's output, i > 0):
    GELU and the 1x1 conv-BN only on a fuse input that needs the projection."""
    x = layer_norm_2d(feature, sd, PD + f"_in_norms.{i}.")
    if i == 0:
        return x
    f = PD + f"_resized_fuses.{i - 1}."
    low = previous
    if f + "_conv_bn_low.conv.weight" in sd:
        low = conv_bn(F.gelu(low), sd, f + "_conv_bn_low.")
    low = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=True)
    return low + (
        conv_bn(F.gelu(x), sd, f + "_conv_bn_high.") if f + "_conv_bn_high.conv.weight" in sd else x
    )


def check_stage(decoder, sd, i, feature, previous, output):
    """Stage i block by block, each on our previous block's output (random axial blocks amplify rounding
    differences ~10x each, so the stage is not compared as a whole)."""
    x = decoder.input_norm(feature) if i == 0 else decoder.fuses[i - 1](previous, feature)
    assert_close(x, ref_stage_input(sd, i, feature, previous), f"stage {i} input")
    for j, block in enumerate(decoder.stages[i]):
        ours = block(x)
        assert_close(ours, ref_block(x, sd, PD + f"_stages.{i}._blocks.{j}."), f"stage {i} block {j}")
        x = ours
    assert PD + f"_stages.{i}._blocks.{len(decoder.stages[i])}._conv1_bn_act.conv.weight" not in sd
    assert torch.equal(x, output)


def ref_predictor(sd, p, pixel, class_emb, mask_emb):
    f = conv_bn(pixel, sd, p + "_pixel_space_head_conv0bnact.", "gelu", padding=2, groups=pixel.shape[1])
    f = conv_bn(f, sd, p + "_pixel_space_head_conv1bnact.", "gelu")
    f = F.normalize(conv_bn(f, sd, p + "_pixel_space_head_last_convbn."), p=2, dim=1)
    logits = conv_bn(class_emb, sd, p + "_transformer_class_head.").transpose(1, 2)
    num = logits.shape[-1]
    logits = logits + torch.tensor([0.0] * (num - 1) + [math.log((num - 1) * VOID_PRIOR / (1 - VOID_PRIOR))])
    masks = torch.einsum("bchw,bcn->bnhw", f, conv_bn(mask_emb, sd, p + "_transformer_mask_head."))
    masks = bn(masks.unsqueeze(1), sd, p + "_pixel_space_mask_batch_norm.").squeeze(1)
    return logits, masks, f


def ref_layer(sd, p, pixel, centres):
    """One kMaX layer: k-means update from the argmax of the layer's own mask logits, self-attention on the
    projected centres (parallel to the update), FFN."""
    n, d, num = centres.shape
    ps = conv_bn(F.gelu(pixel), sd, p + "_pixel_conv1_bn_act.", "gelu")
    qs = conv_bn(centres, sd, p + "_query_conv1_bn_act.", "gelu")
    values = conv_bn(ps, sd, p + "_pixel_v_conv_bn.").flatten(2)
    logits, masks, _ = ref_predictor(sd, p + "_predcitor.", ps, qs, qs)
    flat = masks.flatten(2)
    assign = torch.zeros_like(flat).scatter_(1, flat.argmax(1, keepdim=True), 1.0)
    update = bn(
        torch.einsum("bnl,bdl->bdn", assign, values), sd, p + "_kmeans_query_batch_norm_retrieved_value."
    )
    c = centres + conv_bn(update, sd, p + "_kmeans_query_conv3_bn.")
    qkv = conv_bn(qs, sd, p + "_query_qkv_conv_bn.")
    kd = (qkv.shape[1] - d) // 2
    q, k, v = (t.reshape(n, HEADS, -1, num) for t in torch.split(qkv, [kd, kd, d], dim=1))
    sim = bn(torch.einsum("bhdl,bhdm->bhlm", q, k), sd, p + "_query_self_attention._batch_norm_similarity.")
    out = torch.einsum("bhlm,bhdm->bhdl", sim.softmax(-1), v).reshape(n, d, num)
    out = F.gelu(bn(out, sd, p + "_query_self_attention._batch_norm_retrieved_value."))
    c = F.gelu(c + conv_bn(out, sd, p + "_query_conv3_bn."))
    ffn = conv_bn(conv_bn(c, sd, p + "_query_ffn_conv1_bn_act.", "gelu"), sd, p + "_query_ffn_conv2_bn.")
    return F.gelu(c + ffn), logits, masks


def ref_semantic(sd, feats):
    """Their auxiliary semantic predictor: the 3-conv head on res5 (Cityscapes) or ASPP + two low-level
    fusions (COCO), BN + GELU on the 1x1 image-pooling branch."""
    if SEM + "0.conv.weight" in sd:
        x = feats["res5"]
        x = conv_bn(x, sd, SEM + "0.", "gelu", padding=2, groups=x.shape[1])
        return conv_bn(conv_bn(x, sd, SEM + "1.", "gelu"), sd, SEM + "2.")
    x, a = feats["res5"], SEM + "_aspp."
    outs = [conv_bn(x, sd, a + "_aspp_conv0.", "gelu")]
    outs += [conv_bn(x, sd, a + f"_aspp_conv{i}.", "gelu", 1, r, 1, r) for i, r in ((1, 6), (2, 12), (3, 18))]
    outs.append(conv_bn(x.mean((2, 3), keepdim=True), sd, a + "_aspp_pool.", "gelu").expand_as(outs[0]))
    x = conv_bn(torch.cat(outs, 1), sd, a + "_proj_conv_bn_act.", "gelu")
    for stride, name in ((8, "res3"), (4, "res2")):
        low = conv_bn(feats[name], sd, SEM + f"_low_level_projection_os{stride}.", "gelu")
        x = torch.cat([F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True), low], 1)
        x = conv_bn(x, sd, SEM + f"_low_level_fusion_os{stride}_conv0_bn_act.", "gelu", 1, 2, x.shape[1])
        x = conv_bn(x, sd, SEM + f"_low_level_fusion_os{stride}_conv1_bn_act.", "gelu")
    x = conv_bn(x, sd, SEM + "conv_block_0.", "gelu", padding=2, groups=x.shape[1])
    return conv_bn(conv_bn(x, sd, SEM + "conv_block_1.", "gelu"), sd, SEM + "final_conv.")


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(
        ours, ref, rtol=1e-4, atol=1e-4 * max(scale, 1.0), msg=lambda m: f"{what}: {m}"
    )


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_converted_model_computes_their_forward(name):
    start = time.perf_counter()
    fixture = official_fixture(name)
    sd = random_official_state(fixture["keys"], seed=len(name))
    cfg = preset(name)
    model = build_model(cfg).eval()
    model.load_state_dict(convert_kmax_deeplab(sd, cfg), strict=True)
    pixels = torch.rand(2, 3, *SIZES[name], generator=torch.Generator().manual_seed(1)) * 255
    x = (pixels - 127.5) / 127.5  # their PIXEL_MEAN = PIXEL_STD = 127.5 (ours: x / 127.5 - 1)
    with torch.no_grad():
        feats = model.backbone(x)
        ref_feats = (ref_convnext if "convnext" in name else ref_resnet)(x, sd)
        for key in ("res2", "res3", "res4", "res5", *fixture["pixel_dec_stage_order"]):
            assert_close(feats[key], ref_feats[key], f"backbone {key}")
        maps = model.pixel_decoder(feats)
        for i, key in enumerate(fixture["pixel_dec_stage_order"]):
            check_stage(model.pixel_decoder, sd, i, feats[key], maps[i - 1] if i else None, maps[i])
        assert_close(model.semantic_head(feats), ref_semantic(sd, feats), "semantic head")

        decoder = model.transformer_decoder
        centres = sd[TD + "_cluster_centers.weight"][None].repeat(2, 1, 1)  # their [256, N] table
        for index, (layer, stage) in enumerate(zip(decoder.layers, decoder.layer_inputs)):
            ours, aux, _ = layer(maps[stage], centres)
            ref, ref_logits, ref_masks = ref_layer(
                sd, TD + f"_kmax_transformer_layers.{index}.", maps[stage], centres
            )
            assert_close(aux["class_logits"], ref_logits, f"layer {index} class logits")
            assert_close(aux["mask_logits"], ref_masks, f"layer {index} mask logits")
            assert_close(ours, ref, f"layer {index} centres")
            centres = ours
        out = model(x)
        class_emb = conv_bn(centres, sd, TD + "_class_embedding_projection.", "gelu")
        mask_emb = conv_bn(centres, sd, TD + "_mask_embedding_projection.", "gelu")
        logits, masks, feature = ref_predictor(sd, TD + "_predcitor.", maps[-1], class_emb, mask_emb)
    assert_close(out["class_logits"], logits, "final class logits")
    assert_close(out["mask_logits"], masks, "final mask logits")
    assert_close(out["pixel_feature"], feature, "pixel feature")
    num_classes = fixture["config"]["num_classes"]
    assert out["class_logits"].shape == (2, fixture["config"]["num_queries"], num_classes + 1)
    assert out["mask_logits"].shape[-2:] == tuple(math.ceil(s / 4) for s in SIZES[name])
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_key_converts_with_the_parameter_counts_of_the_fixtures(name):
    fixture = official_fixture(name)
    shapes = fixture["keys"]
    cfg = preset(name)
    converted = convert_kmax_deeplab(meta_official_state(shapes), cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }
    assert len(converted) == fixture["num_keys"]
    count = sum(p.numel() for p in model.parameters())
    semantic = sum(p.numel() for p in model.semantic_head.parameters())
    assert (count, count - semantic) == (
        fixture["num_params"],
        fixture["num_params_without_aux_semantic_head"],
    )
    centres = TD + "_cluster_centers.weight"
    assert list(converted["transformer_decoder.cluster_centers"].shape) == shapes[centres][::-1]


def test_class_rows_and_void_land_where_ours_expect_them():
    """Their class heads (7 kMaX predictors) and the COCO semantic head have 133 + void rows, void last;
    each row keeps its class (or follows ``class_order``), void stays last."""
    shapes = official_fixture("resnet50_coco")["keys"]
    sd = meta_official_state(shapes)
    rows = [k for k in shapes if k.endswith(("_transformer_class_head.conv.bias", "final_conv.conv.bias"))]
    assert len(rows) == 8
    for key in rows:
        sd[key] = torch.arange(134, dtype=torch.float32) + 1000 * rows.index(key)
    weight = TD + "_predcitor._transformer_class_head.conv.weight"
    sd[weight] = torch.arange(134.0)[:, None, None] * torch.ones(1, 256, 1)
    cfg = preset("resnet50_coco")
    out = convert_kmax_deeplab(sd, cfg)
    assert torch.equal(out["predictor.class_head.bias"], sd[CLASS_BIAS])
    assert torch.equal(out["transformer_decoder.layers.5.predictor.class_head.bias"], sd[rows[5]])
    assert torch.equal(out["semantic_head.head.2.bias"], sd[SEM + "final_conv.conv.bias"])

    order = list(range(133))[::-1]  # our class c is their class 132 - c
    out = convert_kmax_deeplab(sd, cfg, class_order=order)
    bias = out["predictor.class_head.bias"] - sd[CLASS_BIAS][0]  # their class index of each of our rows
    assert bias[0].item() == 132 and bias[132].item() == 0 and bias[133].item() == 133  # void stays last
    assert torch.equal(bias[:133], torch.tensor(order, dtype=torch.float32))
    assert out["predictor.class_head.weight"][0, 0, 0].item() == 132
    assert out["predictor.class_head.weight"][133, 7, 0].item() == 133
    sem = out["semantic_head.head.2.bias"] - sd[SEM + "final_conv.conv.bias"][0]
    assert sem[0].item() == 132 and sem[133].item() == 133
    with pytest.raises(ConversionError, match="class_order must be a permutation"):
        convert_kmax_deeplab(sd, cfg, class_order=[0] * 133)


def test_void_prior_goes_on_the_last_class_in_both():
    """Our predictor adds log(K * 0.9 / 0.1) to the last channel, as their add_bias_towards_void."""
    cfg = preset("resnet50_cityscapes")
    sd = random_official_state(official_fixture("resnet50_cityscapes")["keys"], seed=3)
    model = build_model(cfg).eval()
    model.load_state_dict(convert_kmax_deeplab(sd, cfg))
    emb = torch.randn(1, 256, 4)
    with torch.no_grad():
        ours = model.predictor(torch.randn(1, 128, 5, 5), emb, emb)["class_logits"]
    plain = conv_bn(emb, sd, TD + "_predcitor._transformer_class_head.").transpose(1, 2)
    assert_close(ours[..., :-1], plain[..., :-1], "real classes")
    assert_close(ours[..., -1] - plain[..., -1], torch.full((1, 4), math.log(19 * 9.0)), "void prior")


def test_missing_extra_and_misshapen_keys_are_named():
    shapes = official_fixture("resnet50_cityscapes")["keys"]
    cfg = preset("resnet50_cityscapes")
    sd = meta_official_state(shapes)
    missing = PD + "_stages.1._blocks.3._attention._width_axis._key_rpe._embeddings.weight"
    del sd[missing]
    sd["sem_seg_head.predictor._something_new.weight"] = torch.zeros(3)
    bad = TD + "_kmax_transformer_layers.2._query_qkv_conv_bn.conv.weight"
    sd[bad] = torch.zeros(512, 255, 1)
    with pytest.raises(ConversionError) as err:
        convert_kmax_deeplab(sd, cfg)
    msg = str(err.value)
    assert "keys of ours missing from theirs (1): pixel_decoder.stages.1.3.body.1.width_axis.key_rpe" in msg
    assert "keys of theirs no rule converts (1): sem_seg_head.predictor._something_new.weight" in msg
    assert f"{bad} -> transformer_decoder.layers.2.qkv.conv.weight: [512, 255, 1] vs [512, 256, 1]" in msg
    assert "\n" not in msg


def test_a_checkpoint_of_another_model_is_refused_and_tf_ported_files_need_no_counters():
    coco = meta_official_state(official_fixture("resnet50_coco")["keys"])
    with pytest.raises(ConversionError) as err:
        convert_kmax_deeplab(coco, preset("resnet50_cityscapes"))
    msg = str(err.value)
    assert "_auxiliary_semantic_predictor._aspp._aspp_conv0.conv.weight -> semantic_head.aspp" in msg
    assert "... (+" in msg  # long lists are cut
    ported = {k: v for k, v in coco.items() if not k.endswith("num_batches_tracked")}  # convert-tf-weights
    out = convert_kmax_deeplab(ported, preset("resnet50_coco"))
    assert out["backbone.bn1.num_batches_tracked"].item() == 0
    without_sem = {k: v for k, v in coco.items() if not k.startswith(SEM)}
    with pytest.raises(ConversionError, match="missing from theirs .*semantic_head"):
        convert_kmax_deeplab(without_sem, preset("resnet50_coco"))
    no_head = preset("resnet50_coco")
    no_head.semantic_head.enabled = False
    assert not any(k.startswith("semantic_head") for k in convert_kmax_deeplab(coco, no_head))
