"""The convolutional encoder and decoder both first stages share (Rombach et al. 2022, Sec. 3.1, App. G).

The architecture is the VQGAN / DDPM-style encoder-decoder of the paper's released models: per resolution
level ``num_res_blocks`` residual blocks (optionally each followed by single-head self-attention), a strided
downsample between levels, a middle block ``ResBlock -> Attention -> ResBlock`` and a mirrored decoder with one
extra residual block per level. Module attribute names follow the CompVis code (``down.{i}.block.{j}.norm1``,
``mid.attn_1.q`` ...) so that state_dicts of the released checkpoints map onto these modules 1:1.

``Layout`` holds the arguments the encoder and the decoder share (the CompVis ``ddconfig`` minus the channels at
either end); the KL and the VQ autoencoders (``ldm.models.autoencoder``, ``ldm.models.vq``) build both from one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.blocks import GroupNorm32

GROUPS = 32  # GroupNorm groups of the released models; every channel count must be divisible by it.


def _norm(channels: int) -> nn.GroupNorm:
    # the U-Net's GroupNorm: under bf16/fp16 autocast it keeps the activations in half precision instead of
    # autocast's fp32 copy of every map (exactly nn.GroupNorm in fp32)
    return GroupNorm32(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm-SiLU-conv-norm-SiLU-dropout-conv, 1x1 shortcut if widths differ.

    ``[B, in_channels, H, W] -> [B, out_channels, H, W]``.
    """

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection.

    Every pixel attends to every pixel of the same image; ``[B, C, H, W] -> [B, C, H, W]``. Uses
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where available), scale 1/sqrt(C).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)

        # [B, C, H, W] -> [B, 1 head, H*W tokens, C]
        def tokens(t: Tensor) -> Tensor:
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        q, k, v = tokens(self.q(x_norm)), tokens(self.k(x_norm)), tokens(self.v(x_norm))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one pixel, then a 3x3 stride-2 conv (no padding).

    The asymmetric pad makes the conv see exactly pixels [2i, 2i+2], so an even input maps to exactly half.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Container for one resolution level; gives the CompVis key layout ``{block,attn,downsample|upsample}``."""

    def __init__(self, block: nn.ModuleList, attn: nn.ModuleList) -> None:
        super().__init__()
        self.block = block
        self.attn = attn


class _Mid(nn.Module):
    """Middle of encoder and decoder at the lowest resolution: ResBlock -> attention -> ResBlock."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _run_level(level: _Level, h: Tensor) -> Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


@dataclass(frozen=True)
class Layout:
    """Widths, depth and attention placement of the encoder and the decoder.

    ``resolution`` is the nominal training resolution: level i works at ``resolution // 2**i`` and gets attention
    when that size is in ``attn_resolutions`` (as in the released code). The networks run at any input size
    divisible by ``downsample_factor``.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {self.ch_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        bad = sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % GROUPS != 0})
        if bad:
            raise ValueError(
                f"channel widths {bad} (ch={self.ch} x ch_mult={list(self.ch_mult)}) are not divisible by the "
                f"{GROUPS} GroupNorm groups; use a ch that is a multiple of {GROUPS}"
            )

    @classmethod
    def of(cls, owner: str, arguments: dict[str, Any], **defaults: Any) -> Layout:
        """The layout an autoencoder's keyword ``arguments`` give (``defaults`` first); an argument that is no field
        of the layout is a ValueError naming it and ``owner``."""
        names = [f.name for f in fields(cls)]
        if unknown := sorted(set(arguments) - set(names)):
            raise ValueError(f"{owner} got unknown argument(s) {unknown}; its encoder/decoder take {names}")
        return cls(**{**defaults, **arguments})

    @property
    def levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor f between image and latent: 2 ** (levels - 1)."""
        return 2 ** (self.levels - 1)

    def level(self, i_level: int, block_in: int, n_blocks: int) -> tuple[_Level, int]:
        """Level ``i_level``: ``n_blocks`` residual blocks from ``block_in`` to its width ``ch * ch_mult[i]``, each
        followed by attention where the layout places it. Returns (the level, its output width)."""
        block_out = self.ch * self.ch_mult[i_level]
        blocks, attns = nn.ModuleList(), nn.ModuleList()
        for _ in range(n_blocks):
            blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=self.dropout))
            block_in = block_out
            if self.resolution // 2**i_level in self.attn_resolutions:
                attns.append(AttnBlock(block_in))
        return _Level(blocks, attns), block_out


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> ``[B, out_channels, H/f, W/f]`` (moments of a KL posterior: twice the
    latent channels; a VQ encoder's pre-quantisation latent: the latent channels)."""

    def __init__(self, layout: Layout, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.num_resolutions = layout.levels
        self.conv_in = _conv3x3(in_channels, layout.ch)
        self.down = nn.ModuleList()
        block_in = layout.ch
        for i_level in range(layout.levels):
            level, block_in = layout.level(i_level, block_in, layout.num_res_blocks)
            if i_level != layout.levels - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, layout.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3x3(block_in, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            h = _run_level(level, h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, out_ch, h*f, w*f]`` (unbounded; trained towards [-1, 1]).

    ``up[i]`` holds the level that works at ``resolution // 2**i`` (same indexing as the encoder's ``down[i]``),
    although it runs in reverse order; ``up[i].upsample`` exists for i > 0. Each level has one residual block
    more than the encoder's.
    """

    def __init__(self, layout: Layout, z_channels: int, out_ch: int) -> None:
        super().__init__()
        self.num_resolutions = layout.levels
        block_in = layout.ch * layout.ch_mult[-1]
        self.conv_in = _conv3x3(z_channels, block_in)
        self.mid = _Mid(block_in, layout.dropout)
        levels: list[_Level] = []
        for i_level in reversed(range(layout.levels)):
            level, block_in = layout.level(i_level, block_in, layout.num_res_blocks + 1)
            if i_level != 0:
                level.upsample = Upsample(block_in)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))  # index by level so keys read up.{i_level}
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3x3(block_in, out_ch)

    def features(self, z: Tensor) -> Tensor:
        """Everything before the output conv (compiled apart from it: the adaptive GAN weight differentiates that
        conv alone, ``FirstStageLoss.generator_loss``)."""
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            h = _run_level(level, h)
            if i_level != 0:
                h = level.upsample(h)
        return F.silu(self.norm_out(h))

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.features(z))
