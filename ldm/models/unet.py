"""The latent-diffusion U-Net eps_theta(z_t, t, tau(y)) (Rombach et al. 2022, Sec. 3.3, Eq. 3; App. E.2).

A time-conditional U-Net with spatial transformers at chosen resolutions, cross-attending to a conditioning
sequence. Arguments and module tree follow CompVis ``openaimodel.UNetModel`` with ``use_spatial_transformer``
(``time_embed``, ``label_emb``, ``input_blocks.{i}.{j}``, ``middle_block.{0,1,2}``, ``output_blocks.{i}.{j}``,
``out``), so the paper's and Stable Diffusion's U-Net weights load without renaming:

* ``input_blocks``: a 3x3 conv, then per level ``num_res_blocks`` x [ResBlock (+ SpatialTransformer)] and a
  Downsample between levels; ``middle_block``: ResBlock, SpatialTransformer, ResBlock;
  ``output_blocks``: per level (deepest first) ``num_res_blocks + 1`` x [ResBlock on concat(h, skip)
  (+ SpatialTransformer)] with an Upsample after the last one of every level but the top.
* ``attention_resolutions`` are downsample factors (1 = full latent resolution, 2 = after one Downsample...).
* Heads: ``num_heads`` fixed heads of width C/num_heads, or ``num_head_channels`` wide heads (C/width heads).

Latents ``x`` [B, in_channels, H, W] with H and W divisible by 2**(len(channel_mult) - 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.blocks import (
    GROUPS,
    Downsample,
    ResBlock,
    SpatialTransformer,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(
        self, x: Tensor, emb_act: Tensor, context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb_act)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


def _per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    values = [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]
    if len(values) != levels or any(v < 1 for v in values):
        raise ValueError(
            f"{name} must be a positive int or one positive int per level ({levels}), got {value}"
        )
    return values


class UNetModel(nn.Module):
    """Latent U-Net: ``(x [B,C,H,W], t [B], context [B,L,D], context_mask [B,L], y [B]) -> [B,C_out,H,W]``.

    Args (CompVis meaning): ``model_channels`` base width; ``channel_mult`` width multiplier per level;
    ``num_res_blocks`` per level (int or list); ``attention_resolutions`` downsample factors that get a
    SpatialTransformer; ``num_heads`` / ``num_head_channels`` (set exactly one; the other -1);
    ``transformer_depth`` blocks per transformer (int or list per level; the middle uses the last);
    ``context_dim`` width D of the cross-attention context (None: unconditional, the second attention of each
    transformer block is then self-attention); ``use_linear_in_transformer`` linear instead of 1x1-conv
    proj_in/out; ``num_classes`` adds a learned class embedding ``label_emb`` to the time embedding;
    ``use_scale_shift_norm`` FiLM conditioning in the ResBlocks (False in the paper's txt2img / SD models);
    ``use_checkpoint`` gradient checkpointing of every ResBlock and transformer block;
    ``conv_resample`` 3x3 convs in Down/Upsample (else average pooling / plain nearest upsampling).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        num_classes: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = False,
        conv_resample: bool = True,
    ) -> None:
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        levels = len(channel_mult)
        attention_resolutions = sorted({int(r) for r in attention_resolutions})
        res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        depths = _per_level(transformer_depth, levels, "transformer_depth")
        self._check_args(model_channels, channel_mult, attention_resolutions, num_heads, num_head_channels)
        # the architecture, kept for diffusers_config() and for code that inspects the model
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = res_blocks
        self.attention_resolutions = attention_resolutions
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.transformer_depth = depths
        self.context_dim = context_dim
        self.use_linear_in_transformer = use_linear_in_transformer
        self.num_classes = num_classes
        self.dropout = dropout
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.conv_resample = conv_resample

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, dropout, use_scale_shift_norm, use_checkpoint)

        def attn(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = self._heads(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth, context_dim, dropout, use_linear_in_transformer, use_checkpoint
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(res_blocks[level]):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, depths[-1]), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(res_blocks[level] + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch, depths[level]))
                if level and i == res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    @staticmethod
    def _check_args(
        model_channels, channel_mult, attention_resolutions, num_heads, num_head_channels
    ) -> None:
        if not channel_mult or any(m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult}")
        bad = sorted({model_channels * m for m in channel_mult if (model_channels * m) % GROUPS})
        if bad:
            raise ValueError(
                f"U-Net widths {bad} (model_channels={model_channels} x channel_mult={channel_mult}) are not "
                f"divisible by the {GROUPS} GroupNorm groups; use a model_channels that is a multiple of "
                f"{GROUPS}"
            )
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"set exactly one of num_heads ({num_heads}) and num_head_channels ({num_head_channels}); "
                "the other must be -1"
            )
        factors = [2**i for i in range(len(channel_mult))]
        unused = [r for r in attention_resolutions if r not in factors]
        if unused:
            raise ValueError(
                f"attention_resolutions {unused} match no level: they are downsample factors and this U-Net "
                f"has {factors} (channel_mult={channel_mult}); e.g. attention_resolutions="
                f"{factors[1:] or factors}"
            )

    def _heads(self, ch: int) -> tuple[int, int]:
        """(heads, head width) of a transformer at width ``ch``."""
        if self.num_head_channels != -1:
            if ch % self.num_head_channels:
                raise ValueError(
                    f"attention width {ch} is not divisible by num_head_channels={self.num_head_channels}; "
                    "pick a head width that divides model_channels * channel_mult at every attention level"
                )
            return ch // self.num_head_channels, self.num_head_channels
        if ch % self.num_heads:
            raise ValueError(
                f"attention width {ch} is not divisible by num_heads={self.num_heads}; pick a head count that "
                "divides model_channels * channel_mult at every attention level"
            )
        return self.num_heads, ch // self.num_heads

    def _divides(self, ch: int) -> bool:
        return ch % (self.num_head_channels if self.num_head_channels != -1 else self.num_heads) == 0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """Predict the network output (eps, v or x0, as trained) for noisy latents.

        ``x`` float [B, in_channels, H, W]; ``timesteps`` int or float [B] (or a scalar, broadcast);
        ``context`` [B, L, context_dim] (required iff the model has a ``context_dim``); ``context_mask`` bool
        [B, L], True = real token (masked tokens are ignored by cross-attention; at least one True per row);
        ``y`` long [B] class labels in [0, num_classes) (required iff ``num_classes``). Returns
        [B, out_channels, H, W] in the parameter (or autocast) dtype.
        """
        timesteps = self._check_inputs(x, timesteps, context, context_mask, y)
        dtype = self.time_embed[0].weight.dtype  # CompVis casts the input to the model's dtype
        x = x.to(dtype)
        if context is not None:
            context = context.to(dtype)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        emb_act = F.silu(emb)  # every ResBlock's emb_layers starts with this SiLU: compute it once

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb_act, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb_act, context, context_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_act, context, context_mask)
        return self.out[2](F.silu(self.out[0](h)))

    def _check_inputs(self, x, timesteps, context, context_mask, y) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W] latents, got shape {tuple(x.shape)}")
        b, f = x.shape[0], self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"latent size {tuple(x.shape[2:])} is not divisible by the U-Net's downsample factor {f} "
                f"(2 ** (len(channel_mult) - 1)); crop or pad the latents to a multiple of {f}"
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must be [B]=[{b}] (or a scalar), got shape {tuple(timesteps.shape)}")
        if self.context_dim is None and context is not None:
            raise ValueError("this U-Net is unconditional (context_dim=None) but a context was given")
        if self.context_dim is not None:
            if context is None:
                raise ValueError(
                    f"this U-Net cross-attends to a context (context_dim={self.context_dim}); pass context "
                    "[B, L, D] (the null-condition context for unconditional samples)"
                )
            if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
                raise ValueError(
                    f"context must be [B={b}, L, D={self.context_dim}], got {tuple(context.shape)}; set the "
                    "U-Net's context_dim to the text encoder's width"
                )
        if context_mask is not None:
            if context is None:
                raise ValueError("context_mask was given without a context")
            if context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"context_mask must be bool [B, L]={tuple(context.shape[:2])} (True = real token), got "
                    f"{context_mask.dtype} {tuple(context_mask.shape)}"
                )
        if (self.num_classes is None) != (y is None):
            raise ValueError(
                f"y (class labels [B]) must be given iff the U-Net has num_classes (it has "
                f"{self.num_classes})"
            )
        if y is not None and y.shape != (b,):
            raise ValueError(f"y must be class labels [B]=[{b}], got shape {tuple(y.shape)}")
        return timesteps

    def diffusers_config(self, sample_size: int = 64) -> dict:
        """Keyword arguments of diffusers' ``UNet2DConditionModel`` with the same architecture.

        With them, ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` maps this module's
        state_dict (prefixed ``model.diffusion_model.``) onto diffusers' parameter names (used by the parity
        tests, the benchmark and exporters). ``sample_size`` is diffusers' nominal latent size (metadata
        only).
        """
        if not self.conv_resample or len(set(self.num_res_blocks)) != 1:
            raise ValueError(
                "diffusers' UNet2DConditionModel needs conv_resample=True and one num_res_blocks"
            )
        attn = [2**level in self.attention_resolutions for level in range(len(self.channel_mult))]
        widths = [self.model_channels * m for m in self.channel_mult]
        # heads of levels without attention are unused by diffusers; keep the SD-1.5 value where it divides
        heads = [self._heads(w)[0] if self._divides(w) else 1 for w in widths]

        def one_or_all(values: list[int]) -> int | tuple[int, ...]:  # SD-1.5's config writes plain ints
            return values[0] if len(set(values)) == 1 else tuple(values)

        return {
            "sample_size": sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            "block_out_channels": tuple(widths),
            "layers_per_block": self.num_res_blocks[0],
            "transformer_layers_per_block": one_or_all(self.transformer_depth),
            "cross_attention_dim": self.context_dim,
            # diffusers' historical name: with num_attention_heads unset this is the number of heads per level
            "attention_head_dim": one_or_all(heads),
            "use_linear_projection": self.use_linear_in_transformer,
            "resnet_time_scale_shift": "scale_shift" if self.use_scale_shift_norm else "default",
            "num_class_embeds": self.num_classes,
            "norm_num_groups": GROUPS,
            "dropout": self.dropout,
        }
