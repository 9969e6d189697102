"""A small convolutional pixel encoder for CPU experiments and tests (the ``tiny`` preset).

Stem: two 3x3/s2 conv-BN-GELU (stride 4), then four stages (strides 4, 8, 16, 32; the first without
downsampling), each a 3x3/s2 conv-BN-GELU (except stage 1) followed by ``blocks[i]`` residual basic
blocks (3x3 conv-BN-GELU, 3x3 conv-BN with gamma 0, residual, GELU). Padding 1 with stride 2 gives
"SAME" sizes ceil(H / stride).
"""

from __future__ import annotations

import torch
from torch import nn

from kmax_model.layers import ConvNormAct, NormFactory


class BasicBlock(nn.Module):
    def __init__(self, ch: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(ch, ch, norm, 3)
        self.conv2 = ConvNormAct(ch, ch, norm, 3, act=None, gamma_init=0.0)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


class TinyBackbone(nn.Module):
    """``x [B,3,H,W]`` -> ``{"stem", "res2".."res5"}`` with ``widths[0]``, ``widths`` channels at strides
    4, 4, 8, 16, 32."""

    classifier_prefixes: tuple[str, ...] = ()

    def __init__(self, stem_width: int, widths: tuple[int, ...], blocks: tuple[int, ...], norm: NormFactory):
        super().__init__()
        self.stem = nn.Sequential(
            ConvNormAct(3, stem_width, norm, 3, stride=2),
            ConvNormAct(stem_width, widths[0], norm, 3, stride=2),
        )
        self.stages = nn.ModuleList()
        in_ch = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers: list[nn.Module] = [] if i == 0 else [ConvNormAct(in_ch, w, norm, 3, stride=2)]
            layers += [BasicBlock(w, norm) for _ in range(n)]
            self.stages.append(nn.Sequential(*layers))
            in_ch = w
        self.channels = {"stem": widths[0]} | {f"res{i + 2}": w for i, w in enumerate(widths)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        out = {"stem": x}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[f"res{i + 2}"] = x
        return out
