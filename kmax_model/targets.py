"""The training-target contract between the data pipeline and the criterion.

`pipeline.data.augment` builds one `Target` per image at the model's output-stride grid (strided
subsampling of the full-resolution panoptic label, as deeplab2 and bytedance/kmax-deeplab do);
`kmax_model.criterion` consumes a list of them, one per image of the batch.

Conventions shared by every stage (pipeline records, post-processing, evaluation):
- Classes are contiguous ids ``0..K-1``; the model's class logits have ``K + 1`` channels, the last
  one being void.
- A panoptic label map holds ``class_id * label_divisor + instance_id`` (int32). Stuff segments have
  instance 0, thing segments (crowd regions included) instance >= 1. Void pixels hold ``VOID_LABEL``.
- Images entering the model are float ``[B, 3, H, W]`` normalised with `normalize_images`
  (``x / 127.5 - 1``); padding is 0 after normalisation (deeplab2 kmax_deeplab.py L190 @ 64bc1c1a).
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import torch

VOID_LABEL = -1
"""Label-map value of void (unlabelled) pixels."""

IGNORE_INDEX = -1
"""Value of ``Target.semantic`` where the semantic loss ignores the pixel (void)."""

PIXEL_SCALE = 127.5
"""Images are mapped from [0, 255] to [-1, 1] by ``x / PIXEL_SCALE - 1``."""


class Target(TypedDict):
    """Ground truth of one image at the output-stride grid ``h x w``.

    Keys:
        masks:    float32 [M, h, w], one binary mask per segment to predict: every non-crowd thing
                  instance and one mask per stuff class present. Crowd and void pixels belong to no mask
                  (unless the data pipeline is told to train crowd regions as masks of their class).
        labels:   int64 [M], contiguous class id of each mask.
        valid:    bool [h, w], False on the pixels of no mask: void and crowd (v(p) in the reference losses).
        semantic: int64 [h, w], contiguous class id of every labelled pixel (crowd pixels keep their
                  class), ``IGNORE_INDEX`` on void.
        area:     float32 [h, w], pixel count (at this grid) of the mask containing each pixel; 0 where
                  the pixel is in no mask. Drives the small-object bias of Gumbel top-k sampling.
        input_index: optional int64 [H, W] at the INPUT resolution (the crop): index into ``masks`` of the
                  mask containing each pixel, -1 in no mask (void, crowd, padding, and segments absent from
                  the grid). Needed by ``LossConfig.mask_loss_at = "input"`` (kmax_model.mask_points).
    """

    masks: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    semantic: torch.Tensor
    area: torch.Tensor
    input_index: NotRequired[torch.Tensor]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Map uint8-range images ``[B, 3, H, W]`` (values 0..255) to the model's input range [-1, 1]."""
    return images.float() / PIXEL_SCALE - 1.0
