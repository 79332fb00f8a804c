"""Building blocks of the latent-diffusion U-Net (Rombach et al. 2022, Sec. 3.3 and App. E.2).

Timestep embedding, residual blocks conditioned on the time embedding, resampling and the spatial transformer
that injects the conditioning ``context`` through cross-attention (paper Eq. 3). Parameter names follow the
released CompVis ``openaimodel`` / ``attention`` modules (``in_layers.0``, ``emb_layers.1``,
``transformer_blocks.0.attn2.to_k`` ...) so that the paper's and Stable Diffusion's U-Net checkpoints load
1:1.

Speed without changing the maths (every path is exact in fp32; see tests/test_unet_speed.py):

* Under fp16/bf16 autocast, PyTorch runs GroupNorm/LayerNorm in fp32 and writes fp32 activation maps, which
  the next conv/linear casts back. Our norms run on the half-precision activations directly (the CUDA kernels
  accumulate the statistics in fp32) and skip that traffic; outside autocast they are plain ``F.group_norm``.
* Self-attention projects q, k and v with one matmul over the concatenated ``to_q/to_k/to_v`` weights (the
  parameters stay separate), cross-attention projects k and v with one matmul over the context.
* Attention runs through ``F.scaled_dot_product_attention`` on strided ``[B, heads, L, d]`` views of the
  projection output (no copies); the spatial transformer applies the 1x1 ``proj_in`` as a GEMM on the
  transposed view of the normalised map, and writes ``proj_out`` + residual back to ``[B, C, H, W]`` in one
  batched GEMM.
* The SiLU of the time embedding is computed once per forward for all residual blocks (CompVis applies the
  same SiLU inside every block).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

GROUPS = 32  # GroupNorm groups of the released models; every width must be divisible by it.
_HALF = (torch.float16, torch.bfloat16)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (integer or fractional) timesteps, as in DDPM / the Transformer.

    ``timesteps`` [B] -> float32 [B, dim] laid out ``[cos(t * f_0..f_{dim/2-1}), sin(...)]`` with
    ``f_i = max_period ** (-i / (dim // 2))`` (CompVis ``timestep_embedding``; diffusers with
    ``flip_sin_to_cos=True, freq_shift=0``). Odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
    _autocast_enabled = torch.is_autocast_enabled  # takes the device type since torch 2.4
else:  # pragma: no cover - torch 2.3

    def _autocast_enabled(device_type: str) -> bool:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _norm_in_input_dtype(norm, x: Tensor, shape, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``norm(x, shape, weight, bias, eps)`` (F.group_norm or F.layer_norm) in ``x``'s dtype when ``x`` is half
    precision under autocast (affine weights cast to it, autocast off); otherwise the plain call."""
    if x.dtype in _HALF and _autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return norm(x, shape, weight.to(x.dtype), bias.to(x.dtype), eps)
    return norm(x, shape, weight, bias, eps)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that keeps half-precision activations in half precision under autocast.

    fp32 input (or no autocast): exactly ``nn.GroupNorm``. fp16/bf16 input under autocast: normalises the
    half-precision tensor with the affine weights cast to its dtype and returns that dtype, instead of
    autocast's fp32 upcast of the whole map (statistics are accumulated in fp32 by the kernels either way).
    """

    def forward(self, x: Tensor) -> Tensor:
        return _norm_in_input_dtype(F.group_norm, x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with the same half-precision-under-autocast behaviour as :class:`GroupNorm32`."""

    def forward(self, x: Tensor) -> Tensor:
        return _norm_in_input_dtype(F.layer_norm, x, self.normalized_shape, self.weight, self.bias, self.eps)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The U-Net's GroupNorm: 32 groups, affine (eps 1e-5 in res blocks, 1e-6 in spatial transformers)."""
    return GroupNorm32(GROUPS, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: residual branches start as the identity (as in the released U-Net)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _maybe_dropout(drop: nn.Dropout, x: Tensor) -> Tensor:
    return drop(x) if drop.p > 0 and drop.training else x


class ResBlock(nn.Module):
    """Residual block conditioned on the time (+class) embedding.

    ``x`` [B, channels, H, W], ``emb_act`` = SiLU(embedding) [B, emb_channels] -> [B, out_channels, H, W].
    ``h = conv(SiLU(GN(x)))``; then either additive conditioning ``conv(drop(SiLU(GN(h + W e))))`` (SD /
    paper txt2img models) or, with ``use_scale_shift_norm``, FiLM: ``GN(h) * (1 + scale) + shift`` with
    ``(scale, shift) = W e``. Skip connection: identity, or a 1x1 conv when the width changes.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out)
        )
        self.out_layers = nn.Sequential(
            normalization(out), nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out, out, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb_act, use_reentrant=False)
        return self._forward(x, emb_act)

    def _forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        h = self.in_layers[2](F.silu(self.in_layers[0](x)))
        e = self.emb_layers[1](emb_act)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_layers[0](h), 1 + scale)
        else:
            h = self.out_layers[0](h + e)
        h = self.out_layers[3](_maybe_dropout(self.out_layers[2], F.silu(h)))
        return self.skip_connection(x) + h


def _resampled_width(kind: str, channels: int, use_conv: bool, out_channels: int | None) -> int:
    out = out_channels or channels
    if not use_conv and out != channels:
        raise ValueError(f"{kind} without conv cannot change the width; set use_conv=True")
    return out


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 and padding 1 (``op``), or 2x2 average pooling without conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out = _resampled_width("Downsample", channels, use_conv, out_channels)
        self.op = nn.Conv2d(channels, out, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then (``use_conv``) a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out = _resampled_width("Upsample", channels, use_conv, out_channels)
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


def _split_heads(x: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    """``[B, L, parts*heads*d]`` -> ``parts`` strided views ``[B, heads, L, d]`` (no copy; the backward is
    one cat into the fused projection's gradient)."""
    b, n, width = x.shape
    return tuple(t.transpose(1, 2) for t in x.view(b, n, parts, heads, width // (parts * heads)).unbind(2))


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention, Eq. 3 of the paper: softmax(Q K^T / sqrt(d)) V.

    ``x`` [B, N, query_dim]; ``context`` [B, S, context_dim] or None (then self-attention on ``x``);
    ``mask`` bool [B, S] (True = attend; only with context) -> [B, N, query_dim].
    """

    def __init__(
        self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        if context is None:
            qkv = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
            q, k, v = _split_heads(qkv, 3, self.heads)
        else:
            (q,) = _split_heads(self.to_q(x), 1, self.heads)
            k, v = _split_heads(
                F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight])), 2, self.heads
            )
        attn_mask = None if mask is None or context is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, heads, N, d]
        out = out.transpose(1, 2).reshape(b, n, -1)
        return _maybe_dropout(self.to_out[1], self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``x W_a * GELU(x W_g)`` with one projection ``proj`` of width 2*dim_out."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with hidden width ``mult * dim``: ``net = [GEGLU, Dropout, Linear]``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](_maybe_dropout(self.net[1], self.net[0](x)))


class BasicTransformerBlock(nn.Module):
    """Pre-LN transformer block: self-attention, cross-attention to the context, GEGLU feed-forward.

    Without a ``context_dim`` (unconditional model) the second attention is a second self-attention, as in the
    CompVis code. ``x`` [B, N, dim] -> [B, N, dim].
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, mask, use_reentrant=False)
        return self._forward(x, context, mask)

    def _forward(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, mask) + x
        return self.ff(self.norm3(x)) + x


def _as_matrix(weight: Tensor) -> Tensor:
    """A 1x1 conv weight [out, in, 1, 1] (or a linear weight [out, in]) as the matrix [out, in]."""
    return weight.flatten(1)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context`` (paper Sec. 3.3, Fig. 3).

    ``x`` [B, C, H, W] -> GroupNorm -> proj_in -> ``depth`` x BasicTransformerBlock on the H*W tokens ->
    proj_out -> + x. ``proj_in/proj_out`` are 1x1 convs (SD 1.x, paper) or linears (``use_linear``, SD 2.x);
    both are the same per-pixel matrix, applied here to tokens. ``proj_out`` starts at zero.
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = normalization(in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, use_checkpoint)
            for _ in range(depth)
        )
        self.proj_out = zero_module(
            nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)
        )

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, c, height, width = x.shape
        # [B, C, H, W] -> [B, HW, C] as a strided view: the GEMM reads the transposed operand, no copy.
        t = F.linear(
            self.norm(x).flatten(2).transpose(1, 2), _as_matrix(self.proj_in.weight), self.proj_in.bias
        )
        for block in self.transformer_blocks:
            t = block(t, context, mask)
        # proj_out + residual as one batched GEMM that writes [B, C, HW] directly: (x + b) + W t^T.
        out = (x + self.proj_out.bias.to(x.dtype)[:, None, None]).flatten(2)
        w = _as_matrix(self.proj_out.weight).to(out.dtype)
        out = out.baddbmm_(w.expand(b, -1, -1), t.to(out.dtype).transpose(1, 2))
        return out.view(b, c, height, width)
