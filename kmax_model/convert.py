"""Official kMaX-DeepLab checkpoints (bytedance/kmax-deeplab, detectron2 layout) as this project's weights.

`convert_kmax_deeplab(state_dict, cfg)` maps the dict a released checkpoint keeps under its top-level
``"model"`` key (bytedance/kmax-deeplab @ f8e1d0467fd35b4e81f5312748e616a48436beb4, ``kmax_model.py``,
``modeling/backbone/{resnet,convnext}.py``, ``modeling/pixel_decoder/kmax_pixel_decoder.py``,
``modeling/transformer_decoder/kmax_transformer_decoder.py``) onto the state dict of
``build_model(cfg)``. Pure: no file I/O, no Ray; tensors are shared with the input where unchanged.

Prefix map (theirs -> ours; ``sem_seg_head.pixel_decoder.`` = PD, ``sem_seg_head.predictor.`` = TD):

    backbone.stem.conv1.{weight | norm.*}               backbone.{conv1.weight | bn1.*}        (R50)
    backbone.res{s}.{b}.conv{k}.{weight | norm.*}       backbone.layer{s-1}.{b}.{conv{k}.weight | bn{k}.*}
    backbone.res{s}.0.shortcut.{weight | norm.*}        backbone.layer{s-1}.0.downsample.{0.weight | 1.*}
    backbone.{downsample_layers,stages}.*               the same                               (ConvNeXt)
    PD._in_norms.0.*                                    pixel_decoder.input_norm.*
    PD._in_norms.{i}.*  (i >= 1)                        pixel_decoder.fuses.{i-1}.skip_norm.*
    PD._resized_fuses.{i}._conv_bn_{low,high}.*         pixel_decoder.fuses.{i}.{low,skip}_proj.*
    PD._stages.{i}._blocks.{j}._conv1_bn_act.*          pixel_decoder.stages.{i}.{j}.body.0.*
    PD._stages.{i}._blocks.{j}._conv2_bn_act.*          pixel_decoder.stages.{i}.{j}.body.1.*  (bottleneck)
    PD._stages.{i}._blocks.{j}._attention._{a}_axis.    pixel_decoder.stages.{i}.{j}.body.1.{a}_axis.
        qkv_transform.conv.weight                           qkv.weight
        _{query,key,value}_rpe._embeddings.weight           {query,key,value}_rpe
        _batch_norm_{qkv,similarity,retrieved_output}.*     {qkv,similarity,output}_norm.*
    PD._stages.{i}._blocks.{j}._{conv3_bn,shortcut}.*   pixel_decoder.stages.{i}.{j}.{expand,shortcut}.*
    TD._cluster_centers.weight [256, N]                 transformer_decoder.cluster_centers [N, 256] (.T)
    TD._{class,mask}_embedding_projection.*             transformer_decoder.{class,mask}_embed.*
    TD._kmax_transformer_layers.{l}.                    transformer_decoder.layers.{l}.
        _pixel_conv1_bn_act / _query_conv1_bn_act           pixel_conv / center_conv
        _pixel_v_conv_bn / _query_qkv_conv_bn               pixel_value / qkv
        _kmeans_query_batch_norm_retrieved_value            update_norm
        _kmeans_query_conv3_bn / _query_conv3_bn            update_proj / attn_proj
        _query_self_attention._batch_norm_similarity        similarity_norm
        _query_self_attention._batch_norm_retrieved_value   attn_value_norm
        _query_ffn_conv{1_bn_act,2_bn}                      ffn.{0,1}
        _predcitor.<head>                                   predictor.<head>
    TD._predcitor.<head>                                predictor.<head>                        (final head)
      <head>: _pixel_space_head_conv0bnact / conv1bnact / last_convbn -> pixel_head.{0,1,2};
              _transformer_mask_head -> mask_kernel; _pixel_space_mask_batch_norm -> mask_norm;
              _transformer_class_head.conv.{weight,bias} -> class_head.{weight,bias} (class rows)
    TD._auxiliary_semantic_predictor.                   semantic_head.
        _aspp._aspp_conv0 / _aspp_pool / _proj_conv_bn_act  aspp.branches.0 / aspp.pool / aspp.project
        _aspp._aspp_conv{r}.{conv.weight | norm.*}          aspp.branches.{r}.{0.weight | 1.*}
        _low_level_projection_os{8,4}                       proj{3,2}
        _low_level_fusion_os{8,4}_conv{0,1}_bn_act          fuse{3,2}.{0,1}
        conv_block_{0,1} / final_conv.conv.*                head.{0,1} / head.2.* (class rows)
        {0,1,2}.* (Cityscapes' decoder-less head)           head.{0,1,2}.* (".conv" dropped on 2)

Classes: theirs are detectron2's contiguous ids (COCO: the 133 categories in id order, things first;
Cityscapes: the 19 train ids), void last in the class heads (``add_bias_towards_void`` adds the prior to
channel -1, ``panoptic_inference`` drops ``[..., :-1]``) and in the COCO semantic head (134 channels, the
criterion ignores index 133); Cityscapes' semantic head has no void channel. Ours use the same layout
(kmax_model.targets: contiguous ids, void last), so the default mapping is the identity; ``class_order``
permutes the class rows when a dataset numbers its classes otherwise (void stays last).

Strict: every key of theirs is consumed and every entry of ours filled with the same shape, else one
`ConversionError` lists what is wrong (up to `MAX_KEYS_IN_ERROR` names per kind). Two documented
exceptions: ``*.num_batches_tracked`` absent from theirs (files ported from TensorFlow by their
``convert-tf-weights-to-d2.py`` have none) become 0 (the count is unused with a fixed BN momentum), and
the auxiliary semantic head's keys are dropped when ``cfg.semantic_head.enabled`` is False.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from kmax_model.config import KMaXConfig

OFFICIAL_SOURCE = "bytedance/kmax-deeplab@f8e1d0467fd35b4e81f5312748e616a48436beb4"
"""The code whose checkpoint layout and numerics `convert_kmax_deeplab` follows."""
MAX_KEYS_IN_ERROR = 20
NUM_BATCHES_TRACKED = "num_batches_tracked"
AUX_SEMANTIC_PREFIX = "sem_seg_head.predictor._auxiliary_semantic_predictor."

_PD = r"sem_seg_head\.pixel_decoder\."
_TD = r"sem_seg_head\.predictor\."
_REST = r"(?P<rest>.+)"

_LAYER_MODULES = {
    "_pixel_conv1_bn_act": "pixel_conv",
    "_query_conv1_bn_act": "center_conv",
    "_pixel_v_conv_bn": "pixel_value",
    "_query_qkv_conv_bn": "qkv",
    "_kmeans_query_batch_norm_retrieved_value": "update_norm",
    "_kmeans_query_conv3_bn": "update_proj",
    "_query_self_attention._batch_norm_similarity": "similarity_norm",
    "_query_self_attention._batch_norm_retrieved_value": "attn_value_norm",
    "_query_conv3_bn": "attn_proj",
    "_query_ffn_conv1_bn_act": "ffn.0",
    "_query_ffn_conv2_bn": "ffn.1",
}
_HEAD_MODULES = {
    "_pixel_space_head_conv0bnact": "pixel_head.0",
    "_pixel_space_head_conv1bnact": "pixel_head.1",
    "_pixel_space_head_last_convbn": "pixel_head.2",
    "_transformer_mask_head": "mask_kernel",
    "_pixel_space_mask_batch_norm": "mask_norm",
}
_SEMANTIC_MODULES = {
    "_aspp._aspp_conv0": "aspp.branches.0",
    "_aspp._aspp_pool": "aspp.pool",
    "_aspp._proj_conv_bn_act": "aspp.project",
    "_low_level_projection_os8": "proj3",
    "_low_level_fusion_os8_conv0_bn_act": "fuse3.0",
    "_low_level_fusion_os8_conv1_bn_act": "fuse3.1",
    "_low_level_projection_os4": "proj2",
    "_low_level_fusion_os4_conv0_bn_act": "fuse2.0",
    "_low_level_fusion_os4_conv1_bn_act": "fuse2.1",
    "conv_block_0": "head.0",
    "conv_block_1": "head.1",
    "0": "head.0",
    "1": "head.1",
}
_AXIAL_MODULES = {
    "qkv_transform.conv.weight": "qkv.weight",
    "_query_rpe._embeddings.weight": "query_rpe",
    "_key_rpe._embeddings.weight": "key_rpe",
    "_value_rpe._embeddings.weight": "value_rpe",
}
_AXIAL_NORMS = {"qkv": "qkv_norm", "similarity": "similarity_norm", "retrieved_output": "output_norm"}
_BLOCK_MODULES = {
    "_conv1_bn_act": "body.0",
    "_conv2_bn_act": "body.1",
    "_conv3_bn": "expand",
    "_shortcut": "shortcut",
}


class ConversionError(ValueError):
    """An official state dict that does not convert into the configured model (the message names keys)."""


@dataclass(frozen=True)
class _Rule:
    """Their keys matching ``pattern`` (full match) become ``target(groups)``; ``kind`` says how the tensor
    changes: "copy", "transpose" (2-D) or "class_rows" (rows follow the class order, void last)."""

    pattern: re.Pattern
    target: Callable[[dict[str, str]], str]
    kind: str = "copy"


def _alternatives(names: Mapping[str, str]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


def _rule(pattern: str, target: Callable[[dict[str, str]], str], kind: str = "copy") -> _Rule:
    return _Rule(re.compile(pattern), target, kind)


def _backbone_rules() -> list[_Rule]:
    """detectron2 ResNet-50 -> torchvision names; ConvNeXt keys are the same on both sides."""
    res = r"backbone\.res(?P<s>[2-5])\.(?P<b>\d+)\."

    def layer(g: dict[str, str]) -> str:
        return f"backbone.layer{int(g['s']) - 1}.{g['b']}."

    return [
        _rule(r"backbone\.stem\.conv1\.weight", lambda g: "backbone.conv1.weight"),
        _rule(r"backbone\.stem\.conv1\.norm\." + _REST, lambda g: f"backbone.bn1.{g['rest']}"),
        _rule(res + r"conv(?P<k>[123])\.weight", lambda g: layer(g) + f"conv{g['k']}.weight"),
        _rule(res + r"conv(?P<k>[123])\.norm\." + _REST, lambda g: layer(g) + f"bn{g['k']}.{g['rest']}"),
        _rule(res + r"shortcut\.weight", lambda g: layer(g) + "downsample.0.weight"),
        _rule(res + r"shortcut\.norm\." + _REST, lambda g: layer(g) + f"downsample.1.{g['rest']}"),
        _rule(r"backbone\.(?P<rest>(?:downsample_layers|stages)\..+)", lambda g: f"backbone.{g['rest']}"),
    ]


def _pixel_decoder_rules() -> list[_Rule]:
    block = _PD + r"_stages\.(?P<i>\d+)\._blocks\.(?P<j>\d+)\."
    axis = block + r"_attention\._(?P<a>height|width)_axis\."

    def ours(g: dict[str, str]) -> str:
        return f"pixel_decoder.stages.{g['i']}.{g['j']}."

    def axial(g: dict[str, str]) -> str:
        return ours(g) + f"body.1.{g['a']}_axis."

    return [
        _rule(_PD + r"_in_norms\.0\." + _REST, lambda g: f"pixel_decoder.input_norm.{g['rest']}"),
        _rule(
            _PD + r"_in_norms\.(?P<i>[1-9]\d*)\." + _REST,
            lambda g: f"pixel_decoder.fuses.{int(g['i']) - 1}.skip_norm.{g['rest']}",
        ),
        _rule(
            _PD + r"_resized_fuses\.(?P<i>\d+)\._conv_bn_(?P<side>low|high)\." + _REST,
            lambda g: (
                f"pixel_decoder.fuses.{g['i']}.{'low' if g['side'] == 'low' else 'skip'}_proj.{g['rest']}"
            ),
        ),
        _rule(
            block + f"(?P<m>{_alternatives(_BLOCK_MODULES)})\\." + _REST,
            lambda g: ours(g) + f"{_BLOCK_MODULES[g['m']]}.{g['rest']}",
        ),
        _rule(axis + f"(?P<m>{_alternatives(_AXIAL_MODULES)})", lambda g: axial(g) + _AXIAL_MODULES[g["m"]]),
        _rule(
            axis + r"_batch_norm_(?P<n>qkv|similarity|retrieved_output)\." + _REST,
            lambda g: axial(g) + f"{_AXIAL_NORMS[g['n']]}.{g['rest']}",
        ),
    ]


def _head_rules(theirs: str, ours: Callable[[dict[str, str]], str]) -> list[_Rule]:
    """One kMaXPredictor under the prefix ``theirs`` (a regex) -> ``ours(groups)`` + KMaXPredictor names."""
    return [
        _rule(
            theirs + f"(?P<m>{_alternatives(_HEAD_MODULES)})\\." + _REST,
            lambda g: ours(g) + f"{_HEAD_MODULES[g['m']]}.{g['rest']}",
        ),
        _rule(
            theirs + r"_transformer_class_head\.conv\.(?P<p>weight|bias)",
            lambda g: ours(g) + f"class_head.{g['p']}",
            "class_rows",
        ),
    ]


def _transformer_rules() -> list[_Rule]:
    layer = _TD + r"_kmax_transformer_layers\.(?P<l>\d+)\."

    def ours(g: dict[str, str]) -> str:
        return f"transformer_decoder.layers.{g['l']}."

    return [
        _rule(
            _TD + r"_cluster_centers\.weight", lambda g: "transformer_decoder.cluster_centers", "transpose"
        ),
        _rule(
            _TD + r"_(?P<m>class|mask)_embedding_projection\." + _REST,
            lambda g: f"transformer_decoder.{g['m']}_embed.{g['rest']}",
        ),
        _rule(
            layer + f"(?P<m>{_alternatives(_LAYER_MODULES)})\\." + _REST,
            lambda g: ours(g) + f"{_LAYER_MODULES[g['m']]}.{g['rest']}",
        ),
        *_head_rules(layer + r"_predcitor\.", lambda g: ours(g) + "predictor."),
        *_head_rules(_TD + r"_predcitor\.", lambda g: "predictor."),
    ]


def _semantic_rules() -> list[_Rule]:
    sem = re.escape(AUX_SEMANTIC_PREFIX)
    return [
        _rule(
            sem + f"(?P<m>{_alternatives(_SEMANTIC_MODULES)})\\." + _REST,
            lambda g: f"semantic_head.{_SEMANTIC_MODULES[g['m']]}.{g['rest']}",
        ),
        _rule(
            sem + r"_aspp\._aspp_conv(?P<r>[123])\.conv\.weight",
            lambda g: f"semantic_head.aspp.branches.{g['r']}.0.weight",
        ),
        _rule(
            sem + r"_aspp\._aspp_conv(?P<r>[123])\.norm\." + _REST,
            lambda g: f"semantic_head.aspp.branches.{g['r']}.1.{g['rest']}",
        ),
        _rule(
            sem + r"(?:final_conv|2)\.conv\.(?P<p>weight|bias)",
            lambda g: f"semantic_head.head.2.{g['p']}",
            "class_rows",
        ),
    ]


_RULES: tuple[_Rule, ...] = (
    *_backbone_rules(),
    *_pixel_decoder_rules(),
    *_transformer_rules(),
    *_semantic_rules(),
)


def official_key_map(keys: Sequence[str]) -> dict[str, tuple[str, str] | None]:
    """``their key -> (our key, kind)`` for each key (None when no rule matches); kind as in `_Rule`."""
    out: dict[str, tuple[str, str] | None] = {}
    for key in keys:
        out[key] = None
        for rule in _RULES:
            match = rule.pattern.fullmatch(key)
            if match:
                out[key] = (rule.target(match.groupdict()), rule.kind)
                break
    return out


def _row_order(num_rows: int, num_classes: int, class_order: Sequence[int] | None) -> torch.Tensor | None:
    """Row index into theirs for each of our rows: ``class_order`` then void (when present) stays last."""
    if class_order is None:
        return None
    order = list(class_order) + list(range(num_classes, num_rows))
    return torch.as_tensor(order, dtype=torch.long)


def _transform(value: torch.Tensor, kind: str, rows: torch.Tensor | None) -> torch.Tensor:
    if kind == "transpose":
        return value.t().contiguous()
    if kind == "class_rows" and rows is not None:
        return value.index_select(0, rows)
    return value


def _check_class_order(class_order: Sequence[int] | None, num_classes: int) -> None:
    if class_order is not None and sorted(int(c) for c in class_order) != list(range(num_classes)):
        raise ConversionError(
            f"class_order must be a permutation of 0..{num_classes - 1} (their class of each of ours), "
            f"got {len(class_order)} entries"
        )


def _model_shapes(cfg: KMaXConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes, from the model built on the meta device (nothing allocated)."""
    from kmax_model.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _describe(cfg: KMaXConfig, state_dict: Mapping[str, torch.Tensor]) -> str:
    """What the config builds and what the checkpoint's backbone looks like, for the error message."""
    stem = state_dict.get("backbone.downsample_layers.0.0.weight")
    if "backbone.stem.conv1.weight" in state_dict:
        theirs = "a ResNet-50 backbone"
    elif isinstance(stem, torch.Tensor):
        theirs = f"a ConvNeXt backbone of width {stem.shape[0]}"
    else:
        theirs = "no known backbone"
    head = "decoder" if cfg.semantic_head.decoder else "3-conv"
    return (
        f"the configured model (backbone {cfg.backbone.name}, {cfg.num_classes} classes, "
        f"{len(cfg.pixel_decoder.dims)} pixel-decoder stages, {head} semantic head; "
        f"the checkpoint has {theirs})"
    )


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_KEYS_IN_ERROR])
    more = len(items) - MAX_KEYS_IN_ERROR
    return shown + (f" ... (+{more} more)" if more > 0 else "")


@dataclass
class _Problems:
    """What did not convert, by kind (their or our key names, as the kind says)."""

    not_tensors: list[str]
    no_rule: list[str]
    no_counterpart: list[str]
    duplicates: list[str]
    mismatched: list[str]
    missing: list[str]

    def message(self, preset_hint: str) -> str:
        parts = [
            (self.not_tensors, "entries that are not tensors"),
            (self.no_rule, "keys of theirs no rule converts"),
            (self.no_counterpart, "keys of theirs with no counterpart in the model (theirs -> ours)"),
            (self.duplicates, "keys of ours filled twice"),
            (self.mismatched, "shape mismatches (theirs -> ours: their shape vs ours)"),
            (self.missing, "keys of ours missing from theirs"),
        ]
        found = [f"{what} ({len(items)}): {_names(items)}" for items, what in parts if items]
        return f"official checkpoint does not convert into {preset_hint}: " + "; ".join(found)


def convert_kmax_deeplab(
    state_dict: Mapping[str, torch.Tensor],
    cfg: KMaXConfig,
    class_order: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Their model state dict (detectron2 keys, no ``module.`` prefix) -> ours for ``build_model(cfg)``.

    Args:
        state_dict: the ``"model"`` dict of a released checkpoint (tensors).
        cfg: the matching model config (`kmax_model.preset` "resnet50_coco", "convnext_tiny_coco",
            "resnet50_cityscapes", ...).
        class_order: optional; entry c is their class index of our class c (void stays last). None = the
            identity, right for COCO (classes in category-id order) and Cityscapes (train ids).

    Returns:
        Our state dict, in our model's key order, loadable with ``load_state_dict(strict=True)``.

    Raises:
        ConversionError naming the keys that do not convert (see module docstring).
    """
    _check_class_order(class_order, cfg.num_classes)
    shapes = _model_shapes(cfg)
    problems = _Problems([], [], [], [], [], [])
    converted: dict[str, torch.Tensor] = {}
    reported: set[str] = set()  # ours named already (shape mismatch): not listed as missing too
    for key, target in official_key_map(list(state_dict)).items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            problems.not_tensors.append(f"{key} ({type(value).__name__})")
            continue
        if target is None:
            if not (key.startswith(AUX_SEMANTIC_PREFIX) and not cfg.semantic_head.enabled):
                problems.no_rule.append(key)
            continue
        ours, kind = target
        if ours not in shapes:
            if not (key.startswith(AUX_SEMANTIC_PREFIX) and not cfg.semantic_head.enabled):
                problems.no_counterpart.append(f"{key} -> {ours}")
            continue
        if ours in converted:
            problems.duplicates.append(f"{ours} (again from {key})")
            continue
        rows = _row_order(shapes[ours][0], cfg.num_classes, class_order) if kind == "class_rows" else None
        value = _transform(value, kind, rows)
        if tuple(value.shape) != shapes[ours]:
            problems.mismatched.append(f"{key} -> {ours}: {list(value.shape)} vs {list(shapes[ours])}")
            reported.add(ours)
            continue
        converted[ours] = value
    for ours in shapes:
        if ours not in converted and ours.endswith(NUM_BATCHES_TRACKED):
            converted[ours] = torch.zeros((), dtype=torch.long)
    problems.missing = [k for k in shapes if k not in converted and k not in reported]
    if any(vars(problems).values()):
        raise ConversionError(problems.message(_describe(cfg, state_dict)))
    return {k: converted[k] for k in shapes}
