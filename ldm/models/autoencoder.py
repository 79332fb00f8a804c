"""KL-regularised convolutional autoencoder: the LDM first stage (Rombach et al. 2022, Sec. 3.1, App. G).

The architecture is the VQGAN / DDPM-style encoder-decoder of the paper's released models: per resolution
level ``num_res_blocks`` residual blocks (optionally each followed by single-head self-attention), a strided
downsample between levels, a middle block ``ResBlock -> Attention -> ResBlock`` and a mirrored decoder with one
extra residual block per level. Module attribute names follow the CompVis code (``down.{i}.block.{j}.norm1``,
``mid.attn_1.q`` ...) so that state_dicts of the released checkpoints map onto these modules 1:1.

Images are ``[B, in_channels, H, W]`` in [-1, 1]; latents are ``[B, embed_dim, H/f, W/f]`` with
``f = 2 ** (len(ch_mult) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.distributions import DiagonalGaussianDistribution

GROUPS = 32  # GroupNorm groups of the released models; every channel count must be divisible by it.


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


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


def _check_widths(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int) -> None:
    if not ch_mult or any(m <= 0 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    bad = sorted({ch * m for m in ch_mult if (ch * m) % GROUPS != 0})
    if bad:
        raise ValueError(
            f"channel widths {bad} (ch={ch} x ch_mult={list(ch_mult)}) are not divisible by the {GROUPS} "
            f"GroupNorm groups; use a ch that is a multiple of {GROUPS}"
        )


def _attention_at(resolution: int, level: int, attn_resolutions: tuple[int, ...]) -> bool:
    # Like the released code, attention placement refers to the *nominal* training resolution: level i
    # works at resolution // 2**i. The model still runs at any input size divisible by the downsample factor.
    return resolution // 2**level in attn_resolutions


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> moments ``[B, 2*z_channels (double_z) or z_channels, H/f, W/f]``."""

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        in_channels: int = 3,
        z_channels: int = 4,
        double_z: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        ch_mult, attn_res = tuple(int(m) for m in ch_mult), tuple(int(r) for r in attn_resolutions)
        _check_widths(ch, ch_mult, num_res_blocks)
        self.num_resolutions = len(ch_mult)

        self.conv_in = _conv3x3(in_channels, ch)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if _attention_at(resolution, i_level, attn_res):
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)

        self.mid = _Mid(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3x3(block_in, 2 * z_channels if double_z else z_channels)

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
    although it runs in reverse order; ``up[i].upsample`` exists for i > 0.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        out_ch: int = 3,
        z_channels: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        ch_mult, attn_res = tuple(int(m) for m in ch_mult), tuple(int(r) for r in attn_resolutions)
        _check_widths(ch, ch_mult, num_res_blocks)
        self.num_resolutions = len(ch_mult)

        block_in = ch * ch_mult[-1]
        self.conv_in = _conv3x3(z_channels, block_in)
        self.mid = _Mid(block_in, dropout)

        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if _attention_at(resolution, i_level, attn_res):
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample(block_in)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))  # index by level so keys read up.{i_level}

        self.norm_out = _norm(block_in)
        self.conv_out = _conv3x3(block_in, out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            h = _run_level(level, h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL-regularised first-stage autoencoder (LDM Sec. 3.1): x -> q(z|x) = N(mu, sigma^2) -> z -> x_hat.

    Arguments mirror the CompVis ``ddconfig`` plus ``embed_dim``. ``resolution`` is the nominal training
    resolution and only decides at which levels ``attn_resolutions`` places attention; any input whose height
    and width are divisible by ``downsample_factor`` works.

    Shapes: images ``[B, in_channels, H, W]`` in [-1, 1]; latents ``[B, embed_dim, H/f, W/f]``.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        in_channels: int = 3,
        out_ch: int = 3,
        z_channels: int = 4,
        embed_dim: int = 4,
        double_z: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not double_z:
            raise ValueError(
                "AutoencoderKL needs double_z=True: the encoder must predict both mean and log-variance"
            )
        if z_channels < 1 or embed_dim < 1:
            raise ValueError(f"z_channels and embed_dim must be >= 1, got {z_channels} and {embed_dim}")
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.ch_mult = ch_mult
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        common = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions,
            resolution=resolution,
            z_channels=z_channels,
            dropout=dropout,
        )
        self.encoder = Encoder(in_channels=in_channels, double_z=True, **common)
        self.decoder = Decoder(out_ch=out_ch, **common)
        # 1x1 convs between the encoder/decoder width z_channels and the stored latent width embed_dim.
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor f between image and latent (4, 8, 16, 32 for the paper's presets)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the diffusion model sees (``embed_dim``)."""
        return self.embed_dim

    def _check_image(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        f = self.downsample_factor
        height, width = x.shape[-2], x.shape[-1]
        if height % f != 0 or width % f != 0:
            down = (max(f, height // f * f), max(f, width // f * f))
            up = (-(-height // f) * f, -(-width // f) * f)
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsample factor {f}; "
                f"crop/resize to {down[0]}x{down[1]} or pad to {up[0]}x{up[1]}"
            )

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Images ``[B, C, H, W]`` in [-1, 1] -> posterior over latents ``[B, embed_dim, H/f, W/f]``."""
        self._check_image(x)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, embed_dim, h, w]`` -> images ``[B, out_ch, h*f, w*f]`` (approximately [-1, 1])."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"expected latents [B, {self.embed_dim}, h, w], got shape {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x``: returns (reconstruction ``[B, out_ch, H, W]``, posterior).

        ``sample_posterior=False`` decodes the posterior mean (evaluation); ``generator`` seeds the sample.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> Tensor:
        """Weight of the decoder's output conv; the adaptive GAN weight (VQGAN Eq. 7) is taken there."""
        return self.decoder.conv_out.weight
