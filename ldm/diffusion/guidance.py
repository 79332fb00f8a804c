"""Turn a network into the ``denoise(x_t, t) -> x0`` callable the samplers take, with or without
classifier-free guidance (Ho & Salimans 2021).

Guidance is applied to the raw network output: ``out = out_u + scale * (out_c - out_u)``. This is the same
as guiding eps (Ho & Salimans 2021, Eq. 6), v or x0, because for a fixed ``(x_t, t)`` every conversion in
``objectives.py`` is affine in the output, ``x0 = A(x_t, t) + B(t) * out``, and affine maps preserve
combinations whose weights sum to one: ``A + B (out_u + s (out_c - out_u)) = x0_u + s (x0_c - x0_u)``.

Conditions are arbitrary nested structures of tensors: a tensor, ``None``, a tuple/list or a dict of them,
e.g. ``{"context": [B, L, D], "context_mask": [B, L] bool}`` or ``{"y": [B] long}``. The conditional and
unconditional structures must have the same layout; their tensors are concatenated along dim 0 so the network
runs once on a doubled batch ([cond; uncond]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objectives import check_objective, to_x0

ModelFn = Callable[[Tensor, Tensor], Tensor]
CondModelFn = Callable[[Tensor, Tensor, Any], Tensor]
Denoiser = Callable[[Tensor, Tensor], Tensor]


class _AlphaBar:
    """``alphas_cumprod`` kept in float64, copied once per device it is indexed on."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        if alphas_cumprod.ndim != 1:
            raise ValueError(f"alphas_cumprod must be 1-D [T], got shape {tuple(alphas_cumprod.shape)}")
        self._by_device = {"cpu": alphas_cumprod.detach().to("cpu", torch.float64)}

    def __call__(self, t: Tensor) -> Tensor:
        """ab_t for integer timesteps ``t`` [B], float64 on ``t``'s device."""
        key = str(t.device)
        if key not in self._by_device:
            self._by_device[key] = self._by_device["cpu"].to(t.device)
        return self._by_device[key][t.long()]


def model_denoiser(model_fn: ModelFn, objective: str, alphas_cumprod: Tensor) -> Denoiser:
    """Wrap ``model_fn(x_t [B, ...], t LongTensor [B]) -> raw output`` (eps, v or x0 per ``objective``) into
    ``denoise(x_t, t) -> x0_hat`` [B, ...] (float32 or wider)."""
    check_objective(objective)
    alpha_bar = _AlphaBar(alphas_cumprod)

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        return to_x0(objective, x_t, model_fn(x_t, t), alpha_bar(t))

    return denoise


def cfg_denoiser(
    model_fn: CondModelFn,
    objective: str,
    alphas_cumprod: Tensor,
    cond: Any,
    uncond: Any,
    scale: float,
    concat: Callable[[Any, Any], Any] | None = None,
) -> Denoiser:
    """Classifier-free guided ``denoise(x_t, t) -> x0_hat`` from ``model_fn(x_t, t, cond) -> raw output``.

    ``cond``/``uncond`` describe the B samples being drawn (batch size B in every tensor; see the module
    docstring). ``scale = 1`` is plain conditional sampling and ``scale = 0`` plain unconditional sampling: one
    network call on B samples. Any other scale (the paper uses 1.5 on MS-COCO; SD uses 7.5) runs the network once
    on 2B samples built by ``concat(cond, uncond)`` (default :func:`concat_conditions`).
    """
    check_objective(objective)
    alpha_bar = _AlphaBar(alphas_cumprod)
    concat = concat or concat_conditions
    both = None if scale in (0.0, 1.0) else concat(cond, uncond)

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            out = model_fn(x_t, t, cond)
        elif scale == 0.0:
            out = model_fn(x_t, t, uncond)
        else:
            out_c, out_u = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
            # raw-space guidance equals eps/v/x0-space guidance: see the module docstring
            out = out_u + scale * (out_c - out_u)
        return to_x0(objective, x_t, out, alpha_bar(t))

    return denoise


def concat_conditions(cond: Any, uncond: Any, _path: str = "cond") -> Any:
    """Concatenate two conditions of the same layout along the batch dimension.

    Tensors -> ``torch.cat([cond, uncond])``; ``None`` with ``None`` -> ``None``; dicts -> per key (same keys);
    tuples/lists -> per element (same length). Raises a ValueError naming the offending entry otherwise.
    """
    if cond is None and uncond is None:
        return None
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        if cond.shape[1:] != uncond.shape[1:] or cond.dtype != uncond.dtype:
            raise ValueError(
                f"{_path}: conditional {tuple(cond.shape)} {cond.dtype} and unconditional {tuple(uncond.shape)} "
                f"{uncond.dtype} must match except in the batch dimension (pad both to the same max_length)"
            )
        return torch.cat([cond, uncond.to(cond.device)])
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(
                f"{_path}: conditional keys {sorted(cond)} differ from unconditional keys {sorted(uncond)}"
            )
        return {k: concat_conditions(cond[k], uncond[k], f"{_path}[{k!r}]") for k in cond}
    if isinstance(cond, (tuple, list)) and isinstance(uncond, (tuple, list)) and len(cond) == len(uncond):
        return type(cond)(
            concat_conditions(c, u, f"{_path}[{i}]")
            for i, (c, u) in enumerate(zip(cond, uncond, strict=True))
        )
    raise ValueError(
        f"{_path}: cannot batch conditional {type(cond).__name__} with unconditional {type(uncond).__name__}; "
        "both must be tensors, None, or dicts/tuples/lists of the same layout"
    )
