"""The kMaX-DeepLab mask transformer and its decoder ablations in plain PyTorch (no Ray, no MLflow).

Three lines from a notebook::

    import kmax_model
    model = kmax_model.build_model(kmax_model.preset("tiny"))
    out = model(images)  # dict: class_logits, mask_logits, pixel_feature, aux_outputs[, semantic_logits]
"""

from kmax_model import postprocess
from kmax_model.config import (
    PRESET_NAMES,
    BackboneConfig,
    CMTConfig,
    HeadConfig,
    KMaXConfig,
    PixelDecoderConfig,
    SemanticHeadConfig,
    TransformerDecoderConfig,
    preset,
)
from kmax_model.config_objective import LossConfig, PostProcessConfig
from kmax_model.config_utils import apply_overrides, config_from_dict, config_to_dict, load_yaml, save_yaml
from kmax_model.convert import ConversionError, convert_kmax_deeplab
from kmax_model.criterion import build_criterion
from kmax_model.model import KMaXDeepLab, build_model
from kmax_model.pretrained import CheckpointMismatchError, LoadReport, load_pretrained

__all__ = [
    "PRESET_NAMES",
    "BackboneConfig",
    "CMTConfig",
    "CheckpointMismatchError",
    "ConversionError",
    "HeadConfig",
    "KMaXConfig",
    "KMaXDeepLab",
    "LoadReport",
    "LossConfig",
    "PixelDecoderConfig",
    "PostProcessConfig",
    "SemanticHeadConfig",
    "TransformerDecoderConfig",
    "apply_overrides",
    "build_criterion",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "convert_kmax_deeplab",
    "load_pretrained",
    "load_yaml",
    "postprocess",
    "preset",
    "save_yaml",
]
