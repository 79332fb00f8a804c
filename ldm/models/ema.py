"""Exponential moving average of model weights (pure functions on two modules of the same architecture).

Evaluating an EMA of the weights instead of the raw weights removes much of the step-to-step noise of
high-learning-rate training; the LDM U-Net is sampled with EMA weights (Rombach et al. 2022, App. E.2), and we
use it for the autoencoder too when ``ema_decay`` is set.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """Decay for update number ``step``: ``min(decay, (1 + step) / (10 + step))`` with warm-up, so early
    averages are not dominated by the random initialisation."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


class EMAPairs(NamedTuple):
    """The EMA's parameters and buffers matched by name with the model's, in the model's order (``ema_pairs``)."""

    ema_params: list[torch.Tensor]
    params: list[torch.Tensor]
    ema_buffers: list[torch.Tensor]
    buffers: list[torch.Tensor]


def ema_pairs(ema: nn.Module, model: nn.Module) -> EMAPairs:
    """Match the two modules' tensors once: walking both module trees takes milliseconds of host time, every training
    step when ``ema_update`` does it (the SD U-Net has 686 parameters). Valid while the modules keep their tensor
    objects (loading a state dict in place, ``compile()`` and DDP do)."""
    return EMAPairs(*_matched(ema.named_parameters(), model.named_parameters(), "parameter"),
                    *_matched(ema.named_buffers(), model.named_buffers(), "buffer"))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, applied: bool | torch.Tensor = True,
               pairs: EMAPairs | None = None) -> None:
    """``ema ← decay · ema + (1 − decay) · model`` for every parameter; buffers are copied.

    One multi-tensor ``lerp`` over all parameters (``torch._foreach_lerp_``: the same arithmetic as a ``lerp_`` per
    tensor, in a few kernel launches instead of one per parameter).

    ``applied``: whether the optimizer update this EMA follows was applied. ``False`` skips the update; a device
    bool tensor (a decision that has not been read on the host: the bad-step guard of the training modules) weights it by
    ``applied`` on the device instead, with no host sync: ``ema += w · (model − ema)``, ``w = (1 − decay) · applied``,
    in chunks of at most ``_CHUNK`` elements of scratch memory (a fused ``lerp`` takes its weight only from the host;
    the result can differ from it by the rounding of one fused multiply-add).

    ``pairs``: ``ema_pairs(ema, model)``, computed once by a caller that updates every step.
    """
    if applied is False:
        return
    ema_params, params, ema_buffers, buffers = pairs or ema_pairs(ema, model)
    if any(e.dtype != p.dtype for e, p in zip(ema_params, params, strict=True)):
        params = [p.to(e.dtype) for e, p in zip(ema_params, params, strict=True)]
    if ema_params and isinstance(applied, torch.Tensor):
        weight = applied.to(torch.float32) * (1.0 - decay)
        for lo, hi in _chunks(ema_params):
            diff = torch._foreach_sub(params[lo:hi], ema_params[lo:hi])
            torch._foreach_mul_(diff, weight)
            torch._foreach_add_(ema_params[lo:hi], diff)
    elif ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, buffers)


_CHUNK = 64 * 2**20  # elements of scratch memory per chunk of the device-weighted update (256 MiB in fp32)


def _chunks(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    out, lo, size = [], 0, 0
    for i, t in enumerate(tensors):
        size += t.numel()
        if size >= _CHUNK:
            out.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(tensors):
        out.append((lo, len(tensors)))
    return out


def _matched(ema_named, named, what: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The EMA's tensors in the order of the model's, matched by name. The model's are not detached: under no_grad
    nothing records them, and a ``detach`` per parameter costs a dispatch each, every step (686 in the SD U-Net)."""
    by_name, named = dict(ema_named), list(named)
    if len(by_name) != len(named) or not all(name in by_name for name, _ in named):
        raise ValueError(f"the EMA model and the model differ in their {what}s")
    return [by_name[name] for name, _ in named], [t for _, t in named]
