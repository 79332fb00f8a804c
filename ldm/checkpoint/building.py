"""Build models from a checkpoint: weights + the resolved config stored inside it.

A checkpoint written by ``train.py`` is a Lightning checkpoint with an extra ``"ldm"`` entry:
``{"stage": "autoencoder" | "ldm", "config": <resolved config as plain dict>, "latent_stats": {...} | None}``.
Everything (sample.py, evaluate.py, cache, export) rebuilds its models from that alone, through the registry
(``registry.instantiate``); ``read_checkpoint`` gives the same dict for our exports and foreign releases.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ldm.checkpoint.files import atomic_torch_save
from ldm.checkpoint.reading import PIXEL_SPACE, load_checkpoint, read_checkpoint, submodule_state
from ldm.checkpoint.registry import instantiate
from ldm.data.datamodules import canonical_dataset
from ldm.models.latent_stats import latent_statistics
from ldm.pipeline import LatentDiffusion

log = logging.getLogger("ldm.checkpoint")

# Keys of a stage-2 run's `unet` config that say where its weights start, not what to build (configs/stage/ldm.yaml:
# `unet.pretrained`). Checkpoints written before the key existed lack it; later ones store it.
_NOT_ARCHITECTURE = ("pretrained",)
Source = str | os.PathLike | dict[str, Any]


def architecture(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``_target_`` spec that builds a model: its config without the run settings (``pretrained``)."""
    return {k: v for k, v in spec.items() if k not in _NOT_ARCHITECTURE}


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


def _loaded(ckpt: Source) -> tuple[dict[str, Any], str]:
    """The checkpoint dict and a name for it in messages (its path, else the source a reader recorded)."""
    if isinstance(ckpt, dict):
        source = ckpt.get("ldm", {}).get("source")
        return ckpt, str(source.get("path")) if isinstance(source, dict) else "this checkpoint"
    return load_checkpoint(ckpt), str(ckpt)


def build_autoencoder(ckpt: Source, what: str = "the autoencoder") -> tuple[nn.Module, dict[str, Any] | None]:
    """Autoencoder (eval mode) and its latent statistics from an ldm checkpoint (path or loaded; stage 1, or the
    frozen one inside a stage-2 checkpoint) or a dict of ``read_checkpoint``."""
    ckpt, origin = _loaded(ckpt)
    meta, state = ckpt["ldm"], ckpt["state_dict"]
    stage1 = meta["stage"] == "autoencoder"
    spec = meta["config"].get("autoencoder") if stage1 else (meta.get("autoencoder") or {}).get("config")
    # EMA weights when the run kept them (they are what validation measured), else the raw weights
    weights = (stage1 and submodule_state(state, "autoencoder_ema")) or submodule_state(state, "autoencoder")
    if spec is None:
        raise ValueError(f"{origin} holds no autoencoder")
    model = instantiate(spec, key="config.autoencoder" if stage1 else "autoencoder.config", origin=origin)
    if not weights and model.state_dict():  # only the identity first stage has nothing to load
        raise ValueError(f"{origin} holds no autoencoder" if stage1 else
                         "this stage-2 checkpoint holds no autoencoder weights (keys 'autoencoder.*'); it was "
                         "written by another tool or edited. Re-export it from the training run's last.ckpt")
    return strict_load(model, weights, what).eval(), meta.get("latent_stats")


def build_unet(ckpt: Source, use_ema: bool = True, what: str = "the U-Net") -> nn.Module:
    """The U-Net (eval mode) of a checkpoint (its EMA weights when stored and ``use_ema``)."""
    ckpt, origin = _loaded(ckpt)
    spec, state = ckpt["ldm"]["config"].get("unet"), ckpt["state_dict"]
    weights = (use_ema and submodule_state(state, "unet_ema")) or submodule_state(state, "unet")
    if spec is None and weights:  # a CompVis file read without a preset
        from ldm.interop.configs import infer_unet_kwargs

        raise ValueError(f"{origin}: a CompVis U-Net file does not record its attention heads. Name the "
                         "architecture with a preset, e.g. sd15 (Stable Diffusion 1.x: 8 heads) or ldm_kl8_txt2img "
                         f"(unet.pretrained takes the configured unet=...); the weights imply {infer_unet_kwargs(weights)}")
    if spec is None or not weights:
        raise ValueError(f"{origin} holds no U-Net")
    return strict_load(instantiate(architecture(spec), key="config.unet", origin=origin), weights, what).eval()


def measure_latent_stats(
    ckpt: Source, batches: Iterable[torch.Tensor], n_images: int, device: str | torch.device = "cpu", seed: int = 0,
) -> dict[str, Any]:
    """Latent statistics (``ldm.models.latent_stats.latent_statistics``) of the checkpoint's own autoencoder over
    the first ``n_images`` images of ``batches`` ([B, 3, H, W] in [-1, 1]), posterior noise seeded by ``seed``.
    The one place statistics are measured: after stage 1 (``add_latent_stats``) and for imported autoencoders
    (``with_latent_stats``)."""
    device = torch.device(device)
    model = build_autoencoder(ckpt)[0].requires_grad_(False).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return latent_statistics(model.encode, (b.to(device) for b in batches), n_images, generator=gen)


def add_latent_stats(
    path: str | os.PathLike, batches: Iterable[torch.Tensor], n_images: int, device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Measure latent statistics with the checkpoint's own autoencoder weights and store them in it (atomically)."""
    ckpt = load_checkpoint(path)
    stats = measure_latent_stats(ckpt, batches, n_images, device, seed)
    ckpt["ldm"]["latent_stats"] = stats
    atomic_torch_save(ckpt, path)
    return stats


def build_latent_diffusion(ckpt: Source, use_ema: bool = True) -> LatentDiffusion:
    """Everything ``generate`` needs (U-Net, condition encoder, autoencoder, schedule, latent statistics) from a
    stage-2 checkpoint alone, in eval mode on the CPU. ``use_ema``: the U-Net's EMA weights when stored."""
    ckpt, origin = _loaded(ckpt)
    meta, state = ckpt["ldm"], ckpt["state_dict"]
    if meta["stage"] != "ldm":
        raise ValueError(f"{origin} is a {meta['stage']!r} checkpoint; sampling needs a stage-2 checkpoint "
                         "(train.py stage=ldm writes one)")
    config = meta["config"]
    unet = build_unet(ckpt, use_ema=use_ema)

    text_encoder = instantiate(config["text_encoder"], key="config.text_encoder", origin=origin)
    text_state = submodule_state(state, "text_encoder")
    if text_state:  # trained with the U-Net
        strict_load(text_encoder, text_state, "the text encoder")
    elif text_encoder.identity() != meta.get("text_encoder"):
        raise ValueError(f"the frozen text encoder built here, {text_encoder.identity()}, is not the one this "
                         f"model was trained with, {meta.get('text_encoder')}; install the same weights")

    autoencoder, _ = build_autoencoder(ckpt)

    loss = instantiate(config["loss"], key="config.loss", origin=origin)
    return LatentDiffusion(
        unet=unet.eval(), text_encoder=text_encoder.eval(), autoencoder=autoencoder.eval(),
        alphas_cumprod=loss.alphas_cumprod.clone(), objective=loss.objective, latent_stats=meta["latent_stats"],
        latent_norm=meta["latent_norm"], latent_shape=tuple(meta["latent_shape"]),
        class_names={int(label): name for label, name in (meta.get("class_names") or {}).items()},
    )


# ------------------------------------------------------------------------------ any source -> a model

def load_autoencoder(source: str | os.PathLike, spec: dict[str, Any] | None = None) -> nn.Module:
    """Our ``AutoencoderKL`` (eval mode) with the weights of any source ``read_checkpoint`` reads; ``spec``: the
    architecture of a CompVis file (a ``_target_`` dict; ``ldm.export.load_autoencoder`` takes preset names)."""
    return build_autoencoder(read_checkpoint(source, autoencoder_spec=spec), f"the autoencoder of {source}")[0]


def load_unet(source: str | os.PathLike, spec: dict[str, Any] | None = None, use_ema: bool = True) -> nn.Module:
    """Our ``UNetModel`` with the weights of ``source`` (EMA weights of our checkpoints when ``use_ema``)."""
    return build_unet(read_checkpoint(source, unet_spec=spec), use_ema=use_ema, what=f"the U-Net of {source}")


def load_latent_diffusion(source: str | os.PathLike, use_ema: bool = True) -> LatentDiffusion:
    """Everything sampling needs from a stage-2 checkpoint of ours or any of its exports."""
    ckpt = read_checkpoint(source)
    if "source" in ckpt["ldm"]:  # a release of another tool: no condition encoder ldm can rebuild
        raise ValueError(_not_a_model_of_ours(source, ckpt))
    if ckpt["ldm"].get("stage") != "ldm":
        raise ValueError(f"{source} is a {ckpt['ldm'].get('stage')!r} checkpoint; sampling needs a stage-2 checkpoint "
                         "(train.py stage=ldm writes one) or one of its exports (python -m ldm.export)")
    return build_latent_diffusion(ckpt, use_ema=use_ema)


def _not_a_model_of_ours(source: str | os.PathLike, ckpt: dict[str, Any]) -> str:
    """What a foreign release (SD single file, diffusers folder) holds, and how its parts can be used."""
    parts = [(part, name) for part, name in (("autoencoder", "an autoencoder"), ("unet", "a U-Net"))
             if any(k.startswith(part + ".") for k in ckpt["state_dict"])]
    kind = {"diffusers": "a diffusers model or pipeline folder"}.get(ckpt["ldm"]["source"].get("format"),
                                                                      "a CompVis / Stable Diffusion file")
    holds = " and ".join(name for _, name in parts)
    use = " ".join(f"{part}.pretrained={source}" for part, _ in parts)
    return (f"{source} is {kind} that holds {holds} but no text encoder ldm can rebuild, so it cannot sample here: "
            "sample.py needs a stage-2 checkpoint of ours (train.py stage=ldm) or its export (python -m ldm.export). "
            f"Its weights can start a stage-2 run: python train.py stage=ldm {use}"
            + (" unet=<its architecture, e.g. sd15>" if any(p == "unet" for p, _ in parts) else ""))


def with_latent_stats(ckpt: dict[str, Any], data_module: Any, n_images: int = 2048, device: str | torch.device =
                      "cpu", seed: int = 0, latent_scale: float | None = None) -> dict[str, Any]:
    """``ckpt`` with latent statistics: its own, or for an imported autoencoder computed over the first
    ``n_images`` of ``data_module``'s train split (canonical view), as train.py does after stage 1.

    A global scale the source records (diffusers' ``scaling_factor``, e.g. Stable Diffusion's) replaces the
    computed one, so that latents match what U-Nets trained with that autoencoder expect; per-channel
    statistics are always measured (or taken from ``latents_mean`` / ``latents_std`` when recorded).
    ``latent_scale``: the global scale to use (shift 0), e.g. Stable Diffusion's for its single files, which record
    none; it wins over a recorded one.
    """
    if ckpt["ldm"].get("latent_stats"):
        return ckpt
    loader = DataLoader(canonical_dataset(data_module, "train"), batch_size=data_module.batch_size,
                        num_workers=data_module.num_workers)
    stats = measure_latent_stats(ckpt, (batch["image"] for batch in loader), n_images, device, seed)
    stats["measured"] = f"{stats['n_images']} train images of {getattr(data_module, 'describe', data_module.__repr__)()}"
    recorded, where = ckpt["ldm"].get("source_latent_scale"), "the autoencoder's config"
    if latent_scale is not None:
        recorded, where = {"scale": float(latent_scale), "shift": 0.0}, "autoencoder_latent_scale"
    if recorded:
        stats.update(recorded)
        stats["recorded"] = f"{sorted(recorded)} from {where} ({ckpt['ldm'].get('source', {}).get('path')})"
    elif ckpt["ldm"].get("source", {}).get("path") not in (None, PIXEL_SPACE):
        log.warning("the imported autoencoder records no latent scale: scale and shift are measured on the data. A "
                    "pretrained U-Net expects the scale it was trained with: set autoencoder_latent_scale (e.g. "
                    "Stable Diffusion's scaling_factor) when you fine-tune one")
    log.info("latent statistics of the imported autoencoder: scale=%.5f shift=%.4f (%s)", stats["scale"],
             stats["shift"], stats.get("recorded", stats["measured"]))
    ckpt = dict(ckpt)
    ckpt["ldm"] = {**ckpt["ldm"], "latent_stats": stats}
    return ckpt
