"""Shared by the U-Net tests (test_unet_architecture.py, test_unet_speed.py): presets, a small U-Net with
random weights, and inputs for it."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.models.unet import UNetModel

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "unet"


def preset(name: str, **overrides) -> UNetModel:
    cfg = OmegaConf.load(PRESETS / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return instantiate(cfg)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised output layers would hide most of the network)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def small_unet(**overrides) -> UNetModel:
    kwargs = dict(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        num_res_blocks=2,
        attention_resolutions=[2, 4],
        channel_mult=[1, 2, 2],
        num_heads=2,
        context_dim=24,
    )
    return UNetModel(**{**kwargs, **overrides})


def inputs(model: UNetModel, b: int = 2, size: int = 8, tokens: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, model.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (b,), generator=gen)
    ctx = None if model.context_dim is None else torch.randn(b, tokens, model.context_dim, generator=gen)
    return x, t, ctx
