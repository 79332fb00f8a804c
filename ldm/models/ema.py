"""Exponential moving average of model weights (pure functions on two modules of the same architecture).

Evaluating an EMA of the weights instead of the raw weights removes much of the step-to-step noise of
high-learning-rate training; the LDM U-Net is sampled with EMA weights (Rombach et al. 2022, App. E.2), and we
use it for the autoencoder too when ``ema_decay`` is set.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """Decay for update number ``step``: ``min(decay, (1 + step) / (10 + step))`` with warm-up, so early
    averages are not dominated by the random initialisation."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · model`` for every parameter; buffers are copied."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), 1.0 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)
