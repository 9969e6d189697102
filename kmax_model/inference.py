"""The inference network of a kMaX model as one traceable module: pixels in, class and mask outputs out.

`InferenceNetwork` is what ``kmax export`` writes as ONNX, TorchScript or an ExportedProgram; the panoptic
merge (kmax_model.postprocess) stays in Python. It runs the model's eval-mode path and returns only the
final prediction: the auxiliary predictions are not resized, the semantic head does not run, and no
per-layer assignment maps or pixel features are returned.

Contract (`INPUT_CONTRACT`, `OUTPUT_CONTRACT`): ``images`` float32 ``[B, 3, H, W]``, RGB pixel values in
[0, 255] (normalised inside as ``x / 127.5 - 1``, kmax_model.targets.normalize_images). Any ``H, W >= 1``
runs; the convention the model is trained and evaluated with is ``H, W = 4k + 1`` (output stride 4 with
align-corners resizing), reached by padding the image at the bottom/right with `PAD_VALUE` (127.5, which
normalises to the 0 the evaluation pads with). Outputs live on the stride-4 grid ``h = ceil(H / 4)``,
``w = ceil(W / 4)``; upsample the mask logits to ``(H, W)`` with align_corners=True and crop to the image
(kmax_model.postprocess.upsample_mask_logits), as evaluation does.
"""

from __future__ import annotations

import torch
from torch import nn

from kmax_model.model import NUM_DECODER_INPUTS, KMaXDeepLab
from kmax_model.targets import PIXEL_SCALE

OUTPUT_NAMES = ("class_probs", "mask_probs", "class_logits", "mask_logits")
"""The network's outputs, in order."""
PAD_VALUE = PIXEL_SCALE
"""Pixel value to pad with (bottom/right): 127.5 normalises to 0, the padding of evaluation."""
SIZE_MULTIPLE = 4
"""The model's output stride: inputs of ``SIZE_MULTIPLE * k + 1`` pixels align the grid to the image."""

INPUT_CONTRACT = {
    "name": "images",
    "dtype": "float32",
    "shape": ["B", 3, "H", "W"],
    "layout": "NCHW, RGB",
    "range": [0.0, 255.0],
    "normalisation": "inside the network: x / 127.5 - 1",
    "size": "H, W = 4k + 1 as trained and evaluated (the model runs at any H, W >= 1; an exported "
    "artefact at the sizes its format allows)",
    "padding": f"bottom/right with {PAD_VALUE} (normalises to 0) up to the smallest 4k + 1",
}
"""The network's input contract, as written to the export sidecar (JSON-ready)."""
OUTPUT_CONTRACT = {
    "class_probs": "float32 [B, N, K+1], softmax over classes; the last class is void",
    "mask_probs": "float32 [B, N, ceil(H/4), ceil(W/4)], softmax over the N slots",
    "class_logits": "float32 [B, N, K+1], the logits of class_probs",
    "mask_logits": "float32 [B, N, ceil(H/4), ceil(W/4)], the logits of mask_probs (the panoptic merge "
    "upsamples these to H x W before its softmax: kmax_model.postprocess)",
}
"""The network's outputs in `OUTPUT_NAMES` order, as written to the export sidecar."""


class InferenceNetwork(nn.Module):
    """``images [B, 3, H, W]`` (float32 pixel values 0..255, see the module docstring) ->
    ``(class_probs [B, N, K+1], mask_probs [B, N, h, w], class_logits [B, N, K+1], mask_logits [B, N, h, w])``
    with ``h = ceil(H / 4)``, ``w = ceil(W / 4)``.

    The logits equal ``model(normalize_images(images))``'s ``class_logits`` / ``mask_logits`` bit for bit
    (same modules, same order); the model must be in eval mode (BatchNorm statistics, no drop path).
    """

    def __init__(self, model: KMaXDeepLab) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        x = images / PIXEL_SCALE - 1.0
        maps = m.pixel_decoder(m.backbone(x))
        class_emb, mask_emb, _ = m.transformer_decoder(maps[:NUM_DECODER_INPUTS])
        out = m.predictor(maps[-1], class_emb, mask_emb)
        class_logits, mask_logits = out["class_logits"], out["mask_logits"]
        return class_logits.softmax(-1), mask_logits.softmax(1), class_logits, mask_logits


def reference_outputs(model: KMaXDeepLab, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The eager model's own answer for `InferenceNetwork`'s outputs (in `OUTPUT_NAMES` order), through
    ``model.forward`` on normalised images: what an exported network is checked against."""
    from kmax_model.targets import normalize_images

    with torch.no_grad():
        out = model(normalize_images(images))
    cls, masks = out["class_logits"], out["mask_logits"]
    return cls.softmax(-1), masks.softmax(1), cls, masks
