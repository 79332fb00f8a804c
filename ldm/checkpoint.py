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
from torch import Tensor, nn

from ldm.atomic import atomic_write_stream
from ldm.generate import LatentDiffusion
from ldm.models.latent_stats import latent_statistics

# Only classes/functions from these packages may be named by a checkpoint's `_target_`.
_ALLOWED_TARGET_ROOTS = ("ldm.", "torch.")
# Keys of a stage-2 run's `unet` config that say where its weights start, not what to build (configs/stage/ldm.yaml:
# `unet.pretrained`). Checkpoints written before the key existed lack it; later ones store it.
_NOT_ARCHITECTURE = ("pretrained",)


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


def architecture(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``_target_`` spec that builds a model: its config without the run settings (``pretrained``)."""
    return {k: v for k, v in spec.items() if k not in _NOT_ARCHITECTURE}


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix.`` with the prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}


def strict_load(module: nn.Module, state: dict[str, Tensor], what: str) -> nn.Module:
    """``module.load_state_dict(state)`` that fails on any missing, unexpected or mis-shaped key, listing the
    first ones of each kind (never a partial load). Tensors are cast to the module's dtypes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {name}, e.g. {v[:5]}" for name, v in
                 (("missing", missing), ("unexpected", unexpected), ("with other shapes", shapes)) if v]
        raise ValueError(f"{what} does not fit the architecture: " + "; ".join(parts) + ". Name the matching preset "
                         "(preset=...) or check that the file holds this kind of model")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return module


def _source_name(ckpt: dict[str, Any]) -> str:
    return ckpt["ldm"].get("source", {}).get("path", "this checkpoint")


def build_autoencoder(ckpt: str | os.PathLike | dict[str, Any],
                      what: str = "the autoencoder") -> tuple[nn.Module, dict[str, Any] | None]:
    """Autoencoder (eval mode) and its latent statistics from an ldm checkpoint (path or loaded; stage 1, or the
    frozen one inside a stage-2 checkpoint) or a dict of ``ldm.interop.sources.read_checkpoint``."""
    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    meta, state = ckpt["ldm"], ckpt["state_dict"]
    stage1 = meta["stage"] == "autoencoder"
    spec = meta["config"].get("autoencoder") if stage1 else (meta.get("autoencoder") or {}).get("config")
    # EMA weights when the run kept them (they are what validation measured), else the raw weights
    weights = (stage1 and submodule_state(state, "autoencoder_ema")) or submodule_state(state, "autoencoder")
    if spec is None or not weights:
        raise ValueError(f"{_source_name(ckpt)} holds no autoencoder")
    return strict_load(instantiate(dict(spec)), weights, what).eval(), meta.get("latent_stats")


def build_unet(ckpt: str | os.PathLike | dict[str, Any], use_ema: bool = True, what: str = "the U-Net") -> nn.Module:
    """The U-Net (eval mode) of a checkpoint (its EMA weights when stored and ``use_ema``)."""
    ckpt = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    spec, state = ckpt["ldm"]["config"].get("unet"), ckpt["state_dict"]
    weights = (use_ema and submodule_state(state, "unet_ema")) or submodule_state(state, "unet")
    if spec is None and weights:  # a CompVis file read without a preset
        from ldm.interop.configs import infer_unet_kwargs

        raise ValueError(f"{_source_name(ckpt)}: a CompVis U-Net file does not record its attention heads. Name the "
                         "architecture with a preset, e.g. sd15 (Stable Diffusion 1.x: 8 heads) or ldm_kl8_txt2img "
                         f"(unet_pretrained takes the configured unet=...); the weights imply {infer_unet_kwargs(weights)}")
    if spec is None or not weights:
        raise ValueError(f"{_source_name(ckpt)} holds no U-Net")
    return strict_load(instantiate(architecture(spec)), weights, what).eval()


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
    unet = build_unet(ckpt, use_ema=use_ema)

    text_encoder = instantiate(config["text_encoder"])
    text_state = submodule_state(state, "text_encoder")
    if text_state:  # trained with the U-Net
        strict_load(text_encoder, text_state, "the text encoder")
    elif text_encoder.identity() != meta.get("text_encoder"):
        raise ValueError(f"the frozen text encoder built here, {text_encoder.identity()}, is not the one this "
                         f"model was trained with, {meta.get('text_encoder')}; install the same weights")

    if not submodule_state(state, "autoencoder"):
        raise ValueError("this stage-2 checkpoint holds no autoencoder weights (keys 'autoencoder.*'); it was "
                         "written by another tool or edited. Re-export it from the training run's last.ckpt")
    autoencoder, _ = build_autoencoder(ckpt)

    loss = instantiate(config["loss"])
    return LatentDiffusion(
        unet=unet.eval(), text_encoder=text_encoder.eval(), autoencoder=autoencoder.eval(),
        alphas_cumprod=loss.alphas_cumprod.clone(), objective=loss.objective, latent_stats=meta["latent_stats"],
        latent_norm=meta["latent_norm"], latent_shape=tuple(meta["latent_shape"]),
    )
