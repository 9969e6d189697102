"""Typed model configuration of the kMaX-DeepLab mask transformer, its decoder ablations and the presets.

Every architectural number is a field here (no hidden literals in the modules). Each dataclass
validates itself in ``__post_init__`` and its errors name the field with its path inside
`KMaXConfig` (``decoder.num_clusters must be > 0``); `kmax_model.config_utils` prefixes the parents
(``model.decoder.num_clusters ...``) when a config is built from a dict or from dotted overrides.

Reference values: deeplab2 ``model/kmax_deeplab.py``, ``model/builder.py`` and the COCO / Cityscapes
``configs/*/kmax_deeplab/*.textproto`` @ 64bc1c1a (see docs/reference_kmax.md §1, §5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

from kmax_model.config_objective import LossConfig, PostProcessConfig, cityscapes_loss_config

BackboneName = Literal[
    "resnet50", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "tiny"
]
BlockType = Literal["axial", "bottleneck"]
Assignment = Literal["argmax", "cluster_softmax", "spatial_softmax", "cross_attention", "cmt"]
ASSIGNMENT_MODES: tuple[str, ...] = get_args(Assignment)
"""Every value of ``decoder.assignment`` (how a decoder layer updates the cluster centres), listed once."""
CONTROLLED_ASSIGNMENT_MODES: tuple[str, ...] = ("argmax", "cluster_softmax", "spatial_softmax")
"""The controlled one-axis modes (kmax_model.clustering): the same affinity logits (the layer's own mask
logits), the same value projection and the same update ``U = A V^T``; only the normalisation of the
assignment ``A`` differs (and ``cluster_softmax`` also feeds its soft assignment back to the pixel
features, the pixel update described in kmax_model.clustering). ``cross_attention``
(kmax_model.cross_attention), the standard multi-head cross-attention baseline with its own
query/key/value projections, changes more than that one axis and is not in this set; nor is ``cmt``
(kmax_model.cmt: CMT-DeepLab as reconstructed, the cross-attention plus the clustering components)."""
CentreUpdateNorm = Literal["sum", "mass"]
CENTRE_UPDATE_NORMS: tuple[str, ...] = get_args(CentreUpdateNorm)
NormName = Literal["bn", "gn"]
MIN_PIXEL_DECODER_STAGES = 4
"""Pixel-decoder stages at least: strides 32, 16, 8 feed the transformer decoder, the last the final head."""

PRESET_NAMES = (
    "tiny",
    "resnet50_coco",
    "resnet50_cityscapes",
    "convnext_tiny_coco",
    "convnext_small_coco",
    "convnext_base_coco",
    "convnext_large_coco",
    "cmt_resnet50_coco",
)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _unit(name: str, value: float, *, upper_open: bool = True) -> None:
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value!r}")


def _all_positive(name: str, values: tuple) -> None:
    for i, v in enumerate(values):
        if v <= 0:
            raise ValueError(f"{name}[{i}] must be > 0, got {values!r}")


@dataclass
class BackboneConfig:
    """Pixel encoder. ``drop_path_rate`` is the stochastic-depth rate (1 - keep prob), linear over depth
    for ConvNeXt (COCO: T .3, S .4, B .5, L .6; R50 0). ``tiny_*`` fields size the CPU backbone only.
    ``pretrained`` is an optional local checkpoint path the training code loads with `load_pretrained`."""

    name: BackboneName = "resnet50"
    drop_path_rate: float = 0.0
    pretrained: str | None = None
    tiny_stem_width: int = 16
    tiny_widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    tiny_blocks: tuple[int, int, int, int] = (1, 1, 1, 1)

    def __post_init__(self) -> None:
        _unit("backbone.drop_path_rate", self.drop_path_rate)
        _positive("backbone.tiny_stem_width", self.tiny_stem_width)
        _all_positive("backbone.tiny_widths", self.tiny_widths)
        _all_positive("backbone.tiny_blocks", self.tiny_blocks)


@dataclass
class PixelDecoderConfig:
    """Enhanced pixel decoder (deeplab2 ``model/pixel_decoder/kmax.py``), one stage per ``in_features``
    entry, deepest first: stage 0 consumes LN(``in_features[0]``), stage i > 0 fuses the previous stage's
    output with LN(``in_features[i]``). The first three stage outputs (strides 32, 16, 8) feed the transformer
    decoder, the last one the final prediction head. COCO: res5, res4, res3, res2; bytedance's Cityscapes
    R50 adds a fifth stage and reads ``("res5", "res4", "res3", "stem", "res2")`` (detectron2 sorts its
    stride-4 "stem", the max-pool output, before res2), so its final map is at stride 4 with 4 * 32 channels.

    Stage i has ``num_blocks[i]`` blocks of type ``block_types[i]`` with base width ``dims[i]`` and output
    ``4 * dims[i]`` channels. Axial attention uses ``num_heads`` heads, key depth ``dims[i]`` and value depth
    ``2 * dims[i]``; its relative-position tables have ``2 * max_span - 1`` rows (deeplab2 MAX_SPAN = 255),
    and distances beyond ``max_span - 1`` share the last row (clamped, as deeplab2 does), so any input size
    works.

    ``fuse_act_unprojected``: whether a fuse input whose width already equals the stage width (no 1x1
    projection) still goes through GELU. deeplab2 ``layers/resized_fuse.py`` and bytedance
    ``ResizedFuse`` activate only an input they project (False); True keeps this project's earlier
    behaviour (the ``tiny`` preset's res2 skip has the stage width).
    """

    dims: tuple[int, ...] = (512, 256, 128, 64)
    num_blocks: tuple[int, ...] = (1, 5, 1, 1)
    block_types: tuple[BlockType, ...] = (
        "axial",
        "axial",
        "bottleneck",
        "bottleneck",
    )
    in_features: tuple[str, ...] = ("res5", "res4", "res3", "res2")
    num_heads: int = 8
    max_span: int = 255
    drop_path_rate: float = 0.0
    input_ln_eps: float = 1e-6
    rpe_init_std: float = 1.0
    fuse_act_unprojected: bool = True

    def __post_init__(self) -> None:
        _all_positive("pixel_decoder.dims", self.dims)
        _all_positive("pixel_decoder.num_blocks", self.num_blocks)
        lengths = {len(self.dims), len(self.num_blocks), len(self.block_types), len(self.in_features)}
        if len(lengths) != 1:
            raise ValueError(
                "pixel_decoder.dims, num_blocks, block_types and in_features must have one entry per "
                f"stage, got lengths {len(self.dims)}, {len(self.num_blocks)}, {len(self.block_types)}, "
                f"{len(self.in_features)}"
            )
        if len(self.dims) < MIN_PIXEL_DECODER_STAGES:
            raise ValueError(
                f"pixel_decoder needs at least {MIN_PIXEL_DECODER_STAGES} stages (three feed the transformer "
                f"decoder, the last the prediction head), got {len(self.dims)}"
            )
        _positive("pixel_decoder.num_heads", self.num_heads)
        _positive("pixel_decoder.max_span", self.max_span)
        _unit("pixel_decoder.drop_path_rate", self.drop_path_rate)
        _positive("pixel_decoder.input_ln_eps", self.input_ln_eps)
        for i, (d, t) in enumerate(zip(self.dims, self.block_types)):
            if t == "axial" and d % self.num_heads:
                raise ValueError(
                    f"pixel_decoder.dims[{i}]={d} must be divisible by num_heads={self.num_heads}"
                )


@dataclass
class CMTConfig:
    """The components of ``decoder.assignment = "cmt"`` (CMT-DeepLab as reconstructed, kmax_model.cmt, whose
    docstring has the equations). Ignored by every other mode. The original multi-head cross-attention
    (kmax_model.cross_attention) is always on in this mode; each CMT component is one switch, so the
    component-by-component ablation the paper's public text lacks can be run:

    - ``centre_update``: the clustering centre update ``BN_g0(conv1d(BN(A V^T)))`` as a second residual
      branch beside the cross-attention, ``A = softmax_N(logits / assignment_temperature)``;
    - ``residual_assignment``: the assignment logits carried across layers, ``L_l <- L_l + resize(L_{l-1})``;
    - ``pixel_update``: ``F <- F + BN_g0(A^T V_c)`` with the same ``A`` (not on a stride's last layer);
    - ``reference_mask``: each centre predicts a reference mask on a coordinate embedding (CoordConv of
      the grid), added to the assignment logits (location-sensitive clustering) and, with the pixel update,
      coordinates concatenated to the pixel update (``pixel_update_coords``).

    The mask-approximation loss on the reference masks is ``loss.mask_approx_weight`` (0 = off).
    Open choices of the public descriptions, with our defaults (kmax_model.cmt says why):
    ``assignment_temperature`` (1.0), ``detach_assignment`` (False: A is differentiable),
    ``share_value`` (True: the clustering branch reads the cross-attention's pixel values),
    ``centre_update_norm`` ("sum": kMaX's unnormalised sum; "mass": divided by the cluster mass),
    ``reference_dim`` (32: channels of the coordinate embedding and reference kernels),
    ``reference_logit_bn_init`` (0.1: gamma of the reference-logit BN, the predictor's mask-logit value),
    ``pixel_update_coords`` (True).
    """

    centre_update: bool = True
    residual_assignment: bool = True
    pixel_update: bool = True
    reference_mask: bool = True
    assignment_temperature: float = 1.0
    detach_assignment: bool = False
    share_value: bool = True
    centre_update_norm: CentreUpdateNorm = "sum"
    reference_dim: int = 32
    reference_logit_bn_init: float = 0.1
    pixel_update_coords: bool = True

    def __post_init__(self) -> None:
        _positive("cmt.assignment_temperature", self.assignment_temperature)
        _positive("cmt.reference_dim", self.reference_dim)
        _positive("cmt.reference_logit_bn_init", self.reference_logit_bn_init)
        if self.centre_update_norm not in CENTRE_UPDATE_NORMS:
            raise ValueError(
                f"cmt.centre_update_norm must be one of {CENTRE_UPDATE_NORMS}, "
                f"got {self.centre_update_norm!r}"
            )


@dataclass
class TransformerDecoderConfig:
    """kMaX transformer decoder (deeplab2 ``transformer_decoder/kmax.py``, ``dual_path_transformer.py``).

    ``blocks_per_stride`` layers run at strides 32, 16, 8 (decoder depth). ``assignment`` selects how a layer
    updates the centres from the pixels: one of `CONTROLLED_ASSIGNMENT_MODES` (a pixel-to-cluster assignment
    of the layer's mask logits, `kmax_model.clustering`), ``cross_attention`` (multi-head cross-attention
    with its own projections, `kmax_model.cross_attention`) or ``cmt`` (that cross-attention plus
    CMT-DeepLab's components as reconstructed, `kmax_model.cmt`, configured by ``cmt``).
    ``masked_attention`` (``cross_attention`` only): each centre attends only to the pixels where the mask
    probability predicted from the layer's input centres is >= ``masked_attention_threshold`` (after
    Mask2Former's masked attention). ``coord_conv`` adds a location-sensitive clustering inspired by
    CMT-DeepLab (our formulation, see `kmax_model.clustering`; any mode, ``cmt`` included, where it is
    independent of the reference mask).
    Centre self-attention, and the cross-attention of ``cross_attention`` and ``cmt``:
    ``num_heads`` heads, total key depth ``key_dim``, value depth ``hidden_dim``.
    ``drop_path_rate`` applies (independent masks) to the update, attention and FFN residuals (and to
    each of ``cmt``'s residual branches).
    """

    num_clusters: int = 128
    hidden_dim: int = 256
    key_dim: int = 128
    num_heads: int = 8
    ffn_dim: int = 2048
    blocks_per_stride: tuple[int, int, int] = (2, 2, 2)
    drop_path_rate: float = 0.2
    assignment: Assignment = "argmax"
    masked_attention: bool = False
    masked_attention_threshold: float = 0.5
    coord_conv: bool = False
    center_init_std: float = 1.0
    cmt: CMTConfig = field(default_factory=CMTConfig)

    def __post_init__(self) -> None:
        for name in ("num_clusters", "hidden_dim", "key_dim", "num_heads", "ffn_dim"):
            _positive(f"decoder.{name}", getattr(self, name))
        for i, n in enumerate(self.blocks_per_stride):
            if n < 0:
                raise ValueError(
                    f"decoder.blocks_per_stride[{i}] must be >= 0, got {self.blocks_per_stride!r}"
                )
        if sum(self.blocks_per_stride) == 0:
            raise ValueError("decoder.blocks_per_stride must contain at least one layer")
        if self.key_dim % self.num_heads or self.hidden_dim % self.num_heads:
            raise ValueError(
                f"decoder.key_dim ({self.key_dim}) and decoder.hidden_dim ({self.hidden_dim}) must be "
                f"divisible by decoder.num_heads ({self.num_heads})"
            )
        _unit("decoder.drop_path_rate", self.drop_path_rate)
        if self.assignment not in ASSIGNMENT_MODES:
            raise ValueError(f"decoder.assignment must be one of {ASSIGNMENT_MODES}, got {self.assignment!r}")
        if self.masked_attention and self.assignment != "cross_attention":
            raise ValueError(
                "decoder.masked_attention needs decoder.assignment=cross_attention, "
                f"got assignment={self.assignment!r}"
            )
        if not 0.0 < self.masked_attention_threshold < 1.0:
            raise ValueError(
                "decoder.masked_attention_threshold must be in (0, 1), "
                f"got {self.masked_attention_threshold!r}"
            )
        _positive("decoder.center_init_std", self.center_init_std)
        if not isinstance(self.cmt, CMTConfig):
            raise ValueError(f"decoder.cmt must be a CMTConfig, got {type(self.cmt).__name__}")


@dataclass
class HeadConfig:
    """Prediction heads (deeplab2 ``model/decoder/max_deeplab.py``): pixel embedding of ``pixel_embed_dim``
    (L2-normalised) after a depthwise ``kernel_size`` conv and a ``hidden_dim`` 1x1 conv; mask-logit BN with
    gamma ``mask_logit_bn_init``; class logits get the constant void prior ``log(K * p / (1 - p))``."""

    pixel_embed_dim: int = 128
    hidden_dim: int = 256
    kernel_size: int = 5
    mask_logit_bn_init: float = 0.1
    void_prior: float = 0.9
    class_init_std: float = 0.01

    def __post_init__(self) -> None:
        _positive("head.pixel_embed_dim", self.pixel_embed_dim)
        _positive("head.hidden_dim", self.hidden_dim)
        if self.kernel_size <= 0 or self.kernel_size % 2 == 0:
            raise ValueError(f"head.kernel_size must be a positive odd int, got {self.kernel_size}")
        _positive("head.mask_logit_bn_init", self.mask_logit_bn_init)
        if not 0.0 < self.void_prior < 1.0:
            raise ValueError(f"head.void_prior must be in (0, 1), got {self.void_prior}")
        _positive("head.class_init_std", self.class_init_std)


@dataclass
class SemanticHeadConfig:
    """Auxiliary semantic branch, training only (bytedance ``kmax_transformer_decoder.py`` @ f8e1d046).

    ``decoder`` True: a Panoptic-DeepLab decoder on res5 with res3/res2 skips (ASPP with ``aspp_rates``,
    fusions to ``decoder_channels``), then the head, output at stride 4 (COCO, ADE20K). False: bytedance's
    ``USE_AUX_SEMANTIC_DECODER: False`` head straight on res5 (depthwise 5x5 + BN + GELU, 1x1 to
    ``head_channels`` + BN + GELU, 1x1 to the classes), output at stride 32 (Cityscapes).
    ``void_channel``: the logits have K + 1 channels, the last one void (never a target), as COCO's 134;
    False: K channels (bytedance Cityscapes: 19).
    ``pool_norm``: the ASPP image-pooling branch is conv (no bias) + BN + GELU as in deeplab2 and bytedance
    (256 parameters more than the conv bias + GELU it replaces at 256 channels; the norm runs on the pooled
    values broadcast to the feature map, which also works for a batch of one); False keeps this project's
    earlier biased conv + GELU.
    """

    enabled: bool = True
    decoder: bool = True
    void_channel: bool = True
    pool_norm: bool = False
    aspp_channels: int = 256
    aspp_rates: tuple[int, int, int] = (6, 12, 18)
    decoder_channels: int = 256
    low_level_channels: tuple[int, int] = (64, 32)
    head_channels: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _positive("semantic_head.aspp_channels", self.aspp_channels)
        _all_positive("semantic_head.aspp_rates", self.aspp_rates)
        _positive("semantic_head.decoder_channels", self.decoder_channels)
        _all_positive("semantic_head.low_level_channels", self.low_level_channels)
        _positive("semantic_head.head_channels", self.head_channels)
        _unit("semantic_head.dropout", self.dropout)


@dataclass
class KMaXConfig:
    """The whole model plus its objective and inference settings.

    ``num_classes`` is K, void excluded (class logits have K + 1 channels). Only ``output_stride = 4`` is
    implemented (COCO/ADE in deeplab2; Cityscapes uses 4 as in bytedance/kmax-deeplab). ``norm`` picks the
    normalisation of all decoder/head layers (BatchNorm with ``bn_eps``/``bn_momentum``; training converts
    it to SyncBN). ``init_from``: a kmax checkpoint (a trained run's, or an imported official one) whose
    model weights start a new training run (fine-tuning: weights only, a fresh optimiser and schedule).
    """

    num_classes: int = 133
    output_stride: Literal[4] = 4
    norm: NormName = "bn"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    semantic_head: SemanticHeadConfig = field(default_factory=SemanticHeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)
    init_from: str | None = None

    def __post_init__(self) -> None:
        _positive("num_classes", self.num_classes)
        if self.output_stride != 4:
            raise ValueError(
                f"output_stride must be 4 (the only implemented value), got {self.output_stride}"
            )
        if self.norm not in ("bn", "gn"):
            raise ValueError(f"norm must be 'bn' or 'gn', got {self.norm!r}")
        _positive("bn_eps", self.bn_eps)
        _unit("bn_momentum", self.bn_momentum, upper_open=False)
        for name, cls in (
            ("backbone", BackboneConfig),
            ("pixel_decoder", PixelDecoderConfig),
            ("decoder", TransformerDecoderConfig),
            ("head", HeadConfig),
            ("semantic_head", SemanticHeadConfig),
            ("loss", LossConfig),
            ("postprocess", PostProcessConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")


_CONVNEXT_COCO_DROP_PATH = {"tiny": 0.3, "small": 0.4, "base": 0.5, "large": 0.6}


def _tiny() -> KMaXConfig:
    """CPU-sized model: trains on 2 cores at 64-128 px (output stride 4, 32 clusters, one axial block per
    deep stride). Post-processing area limits are 0 (the COCO 400/6400-px limits would void small images).
    Instance discrimination samples 1024 pixels (deeplab2's ADE-641 value) instead of 4096: its K x K
    similarity per output is 16x cheaper, which decides the step time on CPU at crops >= 257 px (measured:
    4.1 s -> 0.35 s per step at 257 px, batch 2); at the synthetic 97 px crops (625 pixels) it changes
    nothing."""
    return KMaXConfig(
        num_classes=8,
        loss=LossConfig(insdis_sample_k=1024),
        backbone=BackboneConfig(name="tiny"),
        pixel_decoder=PixelDecoderConfig(
            dims=(32, 32, 16, 16), num_blocks=(1, 1, 1, 1), num_heads=4, max_span=64
        ),
        decoder=TransformerDecoderConfig(
            num_clusters=32, hidden_dim=64, key_dim=32, num_heads=4, ffn_dim=256, drop_path_rate=0.0
        ),
        head=HeadConfig(pixel_embed_dim=32, hidden_dim=64),
        semantic_head=SemanticHeadConfig(
            aspp_channels=32,
            aspp_rates=(1, 2, 3),
            decoder_channels=32,
            low_level_channels=(16, 8),
            head_channels=32,
        ),
        postprocess=dataclasses.replace(PostProcessConfig.coco(), thing_area_limit=0, stuff_area_limit=0),
    )


def _reference_pixel_decoder(**changes) -> PixelDecoderConfig:
    """The released models' pixel decoder: fuse inputs are activated only before their projection."""
    return PixelDecoderConfig(fuse_act_unprojected=False, **changes)


def _reference_semantic_head(**changes) -> SemanticHeadConfig:
    """The released models' auxiliary semantic head: BN + GELU on the ASPP image-pooling branch."""
    return SemanticHeadConfig(pool_norm=True, **changes)


def _cityscapes_pixel_decoder() -> PixelDecoderConfig:
    """bytedance ``configs/cityscapes/panoptic_segmentation/kmax_r50.yaml`` @ f8e1d046: a fifth bottleneck
    stage (32 base width) on the detectron2 "stem" (stride 4) before res2, so the final map has 128 channels
    at stride 4 (docs/reference_kmax.md §1.3; deeplab2 reads the stride-2 conv output instead: os2)."""
    return _reference_pixel_decoder(
        dims=(512, 256, 128, 64, 32),
        num_blocks=(1, 5, 1, 1, 1),
        block_types=("axial", "axial", "bottleneck", "bottleneck", "bottleneck"),
        in_features=("res5", "res4", "res3", "stem", "res2"),
    )


def _cmt_resnet50_coco() -> KMaXConfig:
    """CMT-DeepLab as reconstructed (kmax_model.cmt) on the ``resnet50_coco`` model, every component on.

    The decoder widths are MaX-DeepLab-S's where CMT-DeepLab builds on it (deeplab2
    ``model/encoder/axial_resnet_instances.py`` L38-105 @ 64bc1c1a, docs/reference_cmt.md §4.3): 128 mask
    slots, 256-channel memory (centres), 8 heads; they equal kMaX's (key depth 128, FFN 2048). Departures,
    all ours: a ResNet-50 backbone and kMaX's pixel decoder instead of MaX-S's axial ResNet (CMT-DeepLab's
    COCO backbone is not recoverable), and kMaX's decoder schedule (2 layers at each of strides 32, 16,
    8) instead of MaX-DeepLab's dual-path blocks beyond stride 16.
    """
    cfg = preset("resnet50_coco")
    cfg.decoder = dataclasses.replace(cfg.decoder, assignment="cmt", cmt=CMTConfig())
    return cfg


def preset(name: str) -> KMaXConfig:
    """A fresh `KMaXConfig` for one of `PRESET_NAMES` (reference values of the released configs of deeplab2
    and bytedance/kmax-deeplab; the official checkpoints convert into these, kmax_model.convert)."""
    if name == "tiny":
        return _tiny()
    if name == "resnet50_coco":
        return KMaXConfig(
            num_classes=133,
            pixel_decoder=_reference_pixel_decoder(),
            semantic_head=_reference_semantic_head(),
            postprocess=PostProcessConfig.coco(),
        )
    if name == "resnet50_cityscapes":
        return KMaXConfig(
            num_classes=19,
            pixel_decoder=_cityscapes_pixel_decoder(),
            decoder=TransformerDecoderConfig(num_clusters=256),
            semantic_head=_reference_semantic_head(decoder=False, void_channel=False),
            loss=cityscapes_loss_config(),
            postprocess=PostProcessConfig.cityscapes(),
        )
    if name == "cmt_resnet50_coco":
        return _cmt_resnet50_coco()
    if name.startswith("convnext_") and name.endswith("_coco"):
        size = name[len("convnext_") : -len("_coco")]
        if size in _CONVNEXT_COCO_DROP_PATH:
            return KMaXConfig(
                num_classes=133,
                backbone=BackboneConfig(
                    name=f"convnext_{size}", drop_path_rate=_CONVNEXT_COCO_DROP_PATH[size]
                ),
                pixel_decoder=_reference_pixel_decoder(),
                semantic_head=_reference_semantic_head(),
                postprocess=PostProcessConfig.coco(),
            )
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
