"""ConvNeXt T/S/B/L pixel encoders whose ``state_dict`` keys equal the official release
(facebookresearch/ConvNeXt ``models/convnext.py``: ``downsample_layers.*``, ``stages.i.j.{gamma,dwconv,
norm,pwconv1,pwconv2}``) minus the classifier ``head.*`` and the final ``norm.*`` (unused: kMaX's pixel
decoder LayerNorms each stage output itself, deeplab2 ``model/pixel_decoder/kmax.py`` @ 64bc1c1a).

"SAME" sizes as deeplab2 ``zero_padding_for_downstream`` (convnext.py L114-136 @ 64bc1c1a): the input is
zero-padded (top/left 1, bottom/right 2) before the 4x4/s4 stem and (0, 1) before each 2x2/s2 downsample,
so a side of H gives ceil(H/4), ceil(H/8), ... (1281 -> 321 -> 161 -> 81 -> 41). The padding comes before
the downsample's LayerNorm, as in deeplab2 and bytedance/kmax-deeplab ``backbone/convnext.py``
``forward_features`` @ f8e1d046, so the padded column enters the strided conv as the LN bias, not as 0.
Stage outputs are not normalised/activated; the stem output (after its LN) is also returned as ``"stem"``
(stride 4). Drop path grows linearly over depth to ``drop_path_rate``; layer scale init 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kmax_model.layers import LayerNorm2d, drop_path

CONVNEXT_SPECS: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
LAYER_SCALE_INIT = 1e-6
LN_EPS = 1e-6
MLP_RATIO = 4
DW_KERNEL = 7
STEM_PAD = (1, 2, 1, 2)  # left, right, top, bottom
DOWNSAMPLE_PAD = (0, 1, 0, 1)


class ConvNeXtBlock(nn.Module):
    """dwconv7x7 -> LN -> Linear(4C) -> GELU -> Linear(C) -> gamma * . -> drop path + residual."""

    def __init__(self, dim: int, drop_path_rate: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, DW_KERNEL, padding=DW_KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, MLP_RATIO * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(MLP_RATIO * dim, dim)
        self.gamma = nn.Parameter(LAYER_SCALE_INIT * torch.ones(dim))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # B x H x W x C
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + drop_path(y, self.drop_path_rate, self.training)


class ConvNeXt(nn.Module):
    """``x [B,3,H,W]`` -> ``{"stem", "res2".."res5"}`` at strides 4, 4, 8, 16, 32 with widths ``dims[0]``,
    ``dims``."""

    classifier_prefixes = ("head.", "norm.")

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=LN_EPS))]
            + [
                nn.Sequential(LayerNorm2d(dims[i - 1], eps=LN_EPS), nn.Conv2d(dims[i - 1], dims[i], 2, 2))
                for i in range(1, len(dims))
            ]
        )
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, as torch.linspace
        self.stages = nn.ModuleList()
        start = 0
        for depth, dim in zip(depths, dims):
            self.stages.append(nn.Sequential(*[ConvNeXtBlock(dim, rates[start + j]) for j in range(depth)]))
            start += depth
        self.channels = {"stem": dims[0]} | {f"res{i + 2}": d for i, d in enumerate(dims)}
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            # Zero pad, then the stem's (conv, LN) or a downsample's (LN, conv).
            x = down(F.pad(x, STEM_PAD if i == 0 else DOWNSAMPLE_PAD))
            if i == 0:
                out["stem"] = x
            x = stage(x)
            out[f"res{i + 2}"] = x
        return out


def build_convnext(size: str, drop_path_rate: float) -> ConvNeXt:
    if size not in CONVNEXT_SPECS:
        raise ValueError(f"unknown ConvNeXt size {size!r}; known: {sorted(CONVNEXT_SPECS)}")
    depths, dims = CONVNEXT_SPECS[size]
    return ConvNeXt(depths, dims, drop_path_rate)
