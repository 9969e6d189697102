"""kMaX enhanced pixel decoder: axial blocks at strides 32 and 16, bottleneck blocks at 8 and 4.

Port of deeplab2 ``model/pixel_decoder/kmax.py`` and ``model/layers/resized_fuse.py`` @ 64bc1c1a (see
docs/reference_kmax.md §1.3), with the stage inputs of bytedance/kmax-deeplab ``kMaXPixelDecoder``
(``pixel_decoder/kmax_pixel_decoder.py`` @ f8e1d046). Every backbone feature it reads gets a LayerNorm
(eps 1e-6) before use. Stage 0 consumes LN(``in_features[0]``, res5); stage i > 0 consumes
``ResizedFuse(previous stage output, LN(in_features[i]))``. Blocks:

    a = gelu(x); shortcut = a if C_in == 4f else BN(conv1x1(a, 4f))
    bottleneck: h = gelu(BN(conv1x1(a, f))); h = gelu(BN(conv3x3(h, f)))
    axial:      h = gelu(BN(conv1x1(a, 2f))); h = gelu(AxialAttention2D(h, key f, value 2f))
    out = drop_path(BN_gamma0(conv1x1(h, 4f))) + shortcut
"""

from __future__ import annotations

import torch
from torch import nn

from kmax_model.axial_attention import AxialAttention2D
from kmax_model.config import PixelDecoderConfig
from kmax_model.layers import ConvNormAct, DropPath, LayerNorm2d, NormFactory, resize_bilinear

BLOCK_EXPANSION = 4  # block output channels = 4 * base width
AXIAL_VALUE_EXPANSION = 2  # axial value depth = 2 * base width


class DecoderBlock(nn.Module):
    """One bottleneck or axial block ``[B, C_in, H, W] -> [B, 4f, H, W]`` (see module docstring)."""

    def __init__(
        self,
        kind: str,
        in_ch: int,
        f: int,
        norm: NormFactory,
        num_heads: int,
        max_span: int,
        drop_path_rate: float,
        rpe_init_std: float = 1.0,
    ) -> None:
        super().__init__()
        out_ch = BLOCK_EXPANSION * f
        self.act = nn.GELU()
        self.shortcut = None if in_ch == out_ch else ConvNormAct(in_ch, out_ch, norm, 1, act=None)
        if kind == "bottleneck":
            self.body = nn.Sequential(ConvNormAct(in_ch, f, norm, 1), ConvNormAct(f, f, norm, 3))
            mid = f
        elif kind == "axial":
            mid = AXIAL_VALUE_EXPANSION * f
            self.body = nn.Sequential(
                ConvNormAct(in_ch, mid, norm, 1),
                AxialAttention2D(mid, f, mid, num_heads, norm, max_span, rpe_init_std),
                nn.GELU(),
            )
        else:
            raise ValueError(
                f"pixel_decoder.block_types entries must be 'axial' or 'bottleneck', got {kind!r}"
            )
        self.expand = ConvNormAct(mid, out_ch, norm, 1, act=None, gamma_init=0.0)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(x)
        shortcut = a if self.shortcut is None else self.shortcut(a)
        return self.drop_path(self.expand(self.body(a))) + shortcut


class ResizedFuse(nn.Module):
    """``low [B,C_low,h,w]`` (coarse) + ``skip [B,C_skip,H,W]`` -> ``[B, out_ch, H, W]``:
    ``resize(BN(conv1x1(gelu(low)))) + BN(conv1x1(gelu(LN(skip))))``. A conv is skipped when the widths
    already match; the GELU before it too unless ``act_unprojected`` (deeplab2/bytedance activate only what
    they project, see `PixelDecoderConfig`)."""

    def __init__(
        self,
        low_ch: int,
        skip_ch: int,
        out_ch: int,
        norm: NormFactory,
        ln_eps: float,
        act_unprojected: bool = True,
    ) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.low_proj = None if low_ch == out_ch else ConvNormAct(low_ch, out_ch, norm, 1, act=None)
        self.skip_norm = LayerNorm2d(skip_ch, eps=ln_eps)
        self.skip_proj = None if skip_ch == out_ch else ConvNormAct(skip_ch, out_ch, norm, 1, act=None)
        self.act_unprojected = act_unprojected

    def _project(self, x: torch.Tensor, proj: nn.Module | None) -> torch.Tensor:
        if proj is not None:
            return proj(self.act(x))
        return self.act(x) if self.act_unprojected else x

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        low = resize_bilinear(self._project(low, self.low_proj), tuple(skip.shape[-2:]))
        return low + self._project(self.skip_norm(skip), self.skip_proj)


class KMaXPixelDecoder(nn.Module):
    """``features {name: [B, C, H, W]}`` (the backbone's) -> one map per stage, deepest first, with
    ``4 * dims[i]`` channels: ``[F32, F16, F8, ..., F_final]``.

    F32/F16/F8 feed the kMaX transformer decoder, the last map the final prediction head (stride 4 for
    the presets). ``in_features`` names the feature each stage reads (`PixelDecoderConfig`).
    """

    def __init__(self, cfg: PixelDecoderConfig, in_channels: dict[str, int], norm: NormFactory) -> None:
        super().__init__()
        unknown = [name for name in cfg.in_features if name not in in_channels]
        if unknown:
            raise ValueError(
                f"pixel_decoder.in_features {unknown} are not features of the backbone "
                f"(it has {sorted(in_channels)})"
            )
        self.in_features = tuple(cfg.in_features)
        self.input_norm = LayerNorm2d(in_channels[cfg.in_features[0]], eps=cfg.input_ln_eps)
        self.fuses = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.out_channels: list[int] = []
        prev = None
        for i, (name, f, n, kind) in enumerate(
            zip(cfg.in_features, cfg.dims, cfg.num_blocks, cfg.block_types)
        ):
            if i == 0:
                in_ch = in_channels[name]
            else:
                self.fuses.append(
                    ResizedFuse(prev, in_channels[name], f, norm, cfg.input_ln_eps, cfg.fuse_act_unprojected)
                )
                in_ch = f
            blocks = []
            for _ in range(n):
                blocks.append(
                    DecoderBlock(
                        kind,
                        in_ch,
                        f,
                        norm,
                        cfg.num_heads,
                        cfg.max_span,
                        cfg.drop_path_rate,
                        cfg.rpe_init_std,
                    )
                )
                in_ch = BLOCK_EXPANSION * f
            self.stages.append(nn.Sequential(*blocks))
            prev = in_ch
            self.out_channels.append(in_ch)

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        x = self.stages[0](self.input_norm(features[self.in_features[0]]))
        outs = [x]
        for i in range(1, len(self.stages)):
            x = self.stages[i](self.fuses[i - 1](x, features[self.in_features[i]]))
            outs.append(x)
        return outs
