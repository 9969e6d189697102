"""ResNet-50 pixel encoder whose ``state_dict`` keys and shapes equal torchvision's ``resnet50``
without the classifier (``fc.*``), so a local torchvision checkpoint loads with ``strict=True``.

Architecture: torchvision ResNet-50 v1.5 (stride on the 3x3 conv, as detectron2 ``STRIDE_IN_1X1: False``
in bytedance/kmax-deeplab), 23,508,032 parameters. BatchNorm eps/momentum come from the model config
(deeplab2: 1e-3 / 0.01). Outputs the four stage outputs (after the block's ReLU, torchvision style) at
strides 4, 8, 16, 32 with "SAME" sizes (a 65-px side gives 17, 9, 5, 3), and the stem output after the
max-pool as ``"stem"`` (64 channels, stride 4: detectron2's "stem" feature, which bytedance's Cityscapes
pixel decoder reads).
"""

from __future__ import annotations

import torch
from torch import nn

from kmax_model.layers import NormFactory

RESNET50_LAYERS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
STEM_WIDTH = 64


class Bottleneck(nn.Module):
    """torchvision-named bottleneck: conv1 1x1, conv2 3x3 (stride), conv3 1x1 (x4), optional downsample."""

    def __init__(self, in_ch: int, width: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        out_ch = width * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """``x [B,3,H,W]`` -> ``{"stem": [B,64,H/4], "res2": [B,256,H/4], "res3": [B,512,H/8],
    "res4": [B,1024,H/16], "res5": [B,2048,H/32]}`` (sizes rounded up)."""

    classifier_prefixes = ("fc.",)

    def __init__(self, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, 7, 2, 3, bias=False)
        self.bn1 = norm(STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = STEM_WIDTH
        self.channels: dict[str, int] = {"stem": STEM_WIDTH}
        for i, (blocks, width) in enumerate(zip(RESNET50_LAYERS, RESNET50_WIDTHS)):
            layers = []
            for j in range(blocks):
                layers.append(Bottleneck(in_ch, width, 2 if (j == 0 and i > 0) else 1, norm))
                in_ch = width * BOTTLENECK_EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            self.channels[f"res{i + 2}"] = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {"stem": x}
        for i in range(len(RESNET50_LAYERS)):
            x = getattr(self, f"layer{i + 1}")(x)
            out[f"res{i + 2}"] = x
        return out
