"""Build models from our checkpoints: weights + the resolved config stored inside every checkpoint.

A checkpoint written by ``train.py`` is a Lightning checkpoint with an extra ``"ldm"`` entry:
``{"stage": "autoencoder" | "ldm", "config": <resolved config as plain dict>, "latent_stats": {...} | None}``.
Everything (sample.py, evaluate.py, cache, export) rebuilds its models from that alone.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.atomic import atomic_write_stream
from ldm.generate import LatentDiffusion
from ldm.models.latent_stats import latent_statistics

# Only classes/functions from these packages may be named by a checkpoint's `_target_`.
_ALLOWED_TARGET_ROOTS = ("ldm.", "torch.")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path`` then rename, so ``path`` is never half-written."""
    atomic_write_stream(path, lambda f: torch.save(obj, f), fsync=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint without executing pickled code (``weights_only=True``) and check it is ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "ldm" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not an ldm training checkpoint (no 'ldm' entry with the run config); "
            "pretrained Stable Diffusion / diffusers weights are imported with ldm.export instead"
        )
    return ckpt


def instantiate(spec: dict[str, Any], **overrides: Any) -> Any:
    """Build ``spec["_target_"](**spec)`` recursively, as Hydra would, without Hydra (library code)."""
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ValueError(f"expected a mapping with a '_target_' key, got {spec!r}")
    target = spec["_target_"]
    if not target.startswith(_ALLOWED_TARGET_ROOTS):
        raise ValueError(f"refusing to build {target!r} from a checkpoint: only {_ALLOWED_TARGET_ROOTS} allowed")
    module_name, _, attr = target.rpartition(".")
    fn = getattr(importlib.import_module(module_name), attr)
    kwargs = {}
    for key, value in spec.items():
        if key.startswith("_"):
            continue
        kwargs[key] = instantiate(value) if isinstance(value, dict) and "_target_" in value else value
    kwargs.update(overrides)
    return fn(**kwargs)


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix.`` with the prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}


def build_autoencoder(ckpt: str | os.PathLike | dict[str, Any]) -> tuple[nn.Module, dict[str, Any] | None]:
    """Stage-1 autoencoder (eval mode) and its latent statistics from an ldm checkpoint (path or loaded)."""
    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    meta = ckpt["ldm"]
    spec = meta["config"].get("autoencoder")
    if spec is None:
        raise ValueError("this checkpoint's config has no 'autoencoder' entry")
    model = instantiate(spec)
    # EMA weights when the run kept them (they are what validation measured), else the raw weights
    state = submodule_state(ckpt["state_dict"], "autoencoder_ema") or submodule_state(ckpt["state_dict"], "autoencoder")
    model.load_state_dict(state, strict=True)
    return model.eval(), meta.get("latent_stats")


def add_latent_stats(
    path: str | os.PathLike, batches: Iterable[torch.Tensor], n_images: int, device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Compute latent statistics with the checkpoint's own autoencoder weights and store them in it (atomically)."""
    ckpt = load_checkpoint(path)
    model, _ = build_autoencoder(ckpt)
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    stats = latent_statistics(model.encode, (b.to(device) for b in batches), n_images, generator=gen)
    ckpt["ldm"]["latent_stats"] = stats
    atomic_torch_save(ckpt, path)
    return stats


def build_latent_diffusion(ckpt: str | os.PathLike | dict[str, Any], use_ema: bool = True) -> LatentDiffusion:
    """Everything ``generate`` needs (U-Net, condition encoder, autoencoder, schedule, latent statistics) from a
    stage-2 checkpoint alone, in eval mode on the CPU. ``use_ema``: the U-Net's EMA weights when stored."""
    source = ckpt if isinstance(ckpt, dict) else str(ckpt)
    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    meta, state = ckpt["ldm"], ckpt["state_dict"]
    if meta["stage"] != "ldm":
        raise ValueError(f"{source if isinstance(source, str) else 'this checkpoint'} is a {meta['stage']!r} "
                         "checkpoint; sampling needs a stage-2 checkpoint (train.py stage=ldm writes one)")
    config = meta["config"]

    unet = instantiate(config["unet"])
    unet_state = (use_ema and submodule_state(state, "unet_ema")) or submodule_state(state, "unet")
    unet.load_state_dict(unet_state, strict=True)

    text_encoder = instantiate(config["text_encoder"])
    text_state = submodule_state(state, "text_encoder")
    if text_state:  # trained with the U-Net
        text_encoder.load_state_dict(text_state, strict=True)
    elif text_encoder.identity() != meta.get("text_encoder"):
        raise ValueError(f"the frozen text encoder built here, {text_encoder.identity()}, is not the one this "
                         f"model was trained with, {meta.get('text_encoder')}; install the same weights")

    autoencoder = instantiate(meta["autoencoder"]["config"])
    ae_state = submodule_state(state, "autoencoder")
    if not ae_state:
        raise ValueError("this stage-2 checkpoint holds no autoencoder weights (keys 'autoencoder.*'); it was "
                         "written by another tool or edited. Re-export it from the training run's last.ckpt")
    autoencoder.load_state_dict(ae_state, strict=True)

    loss = instantiate(config["loss"])
    return LatentDiffusion(
        unet=unet.eval(), text_encoder=text_encoder.eval(), autoencoder=autoencoder.eval(),
        alphas_cumprod=loss.alphas_cumprod.clone(), objective=loss.objective, latent_stats=meta["latent_stats"],
        latent_norm=meta["latent_norm"], latent_shape=tuple(meta["latent_shape"]),
    )
