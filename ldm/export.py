"""Import pretrained weights (Stable Diffusion / CompVis / diffusers) and export ours to safetensors, diffusers and
the CompVis single-file layout.

    python -m ldm.export ckpt=outputs/ldm/<run>/checkpoints/last.ckpt format=diffusers out=exports/my-ldm
    python -m ldm.export ckpt=... format=safetensors out=exports/my-ldm.safetensors weights=ema dtype=float16
    python -m ldm.export ckpt=... format=compvis out=exports/my-ldm.ckpt

Python API (any source ``ldm.interop.sources`` reads: our checkpoints and exports, CompVis/SD single files,
standalone CompVis autoencoders, diffusers model or pipeline folders):

    load_autoencoder(source, preset=None)  -> AutoencoderKL          (eval mode, weights loaded)
    load_unet(source, preset=None)         -> UNetModel
    load_latent_diffusion(source)          -> LatentDiffusion (our stage-2 checkpoints and their exports)

``preset`` names the architecture of sources without a config (CompVis files): a preset of ``configs/autoencoder``
/ ``configs/unet`` (``kl_f8``, ``sd15``, ...), a path to such a YAML, or a ``_target_`` dict. Weights whose keys or
shapes do not fit are an error listing the first mismatches.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import Tensor, nn

from ldm.atomic import atomic_write, atomic_write_text
from ldm.checkpoint import atomic_torch_save, build_latent_diffusion
from ldm.diffusion.schedules import make_betas
from ldm.generate import LatentDiffusion
from ldm.interop.configs import (
    DIFFUSERS_VERSION,
    attention_levels,
    unet_diffusers_config,
    vae_diffusers_config,
)
from ldm.interop.keymaps import unet_to_diffusers, vae_to_diffusers
from ldm.interop.sources import (
    COMPVIS_AE,
    COMPVIS_COND,
    COMPVIS_UNET,
    EXPORT_FORMAT,
    EXPORT_KEY,
    EXPORT_META,
    autoencoder_from,
    read_checkpoint,
    unet_from,
)

log = logging.getLogger("ldm.export")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FORMATS = ("safetensors", "diffusers", "compvis")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BETA_SCHEDULES = {"linear": "scaled_linear", "linear_plain": "linear", "cosine": "squaredcos_cap_v2"}
_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# ------------------------------------------------------------------------------------------------- import

def preset_spec(group: str, preset: str | os.PathLike | dict | None) -> dict[str, Any] | None:
    """A ``_target_`` spec from a preset name of ``configs/<group>/``, a YAML path or a dict (None: None)."""
    if preset is None or isinstance(preset, dict):
        return preset
    path = Path(preset)
    if not path.is_file():
        path = CONFIGS / group / f"{preset}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
            raise ValueError(f"unknown {group} preset {preset!r}: use one of {names} or a path to a YAML file")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ValueError(f"{path} is not an architecture preset (a mapping with _target_)")
    return spec


def read_any(source: str | os.PathLike, autoencoder_preset: Any = None, unet_preset: Any = None) -> dict[str, Any]:
    """``ldm.interop.sources.read_checkpoint`` with presets given by name, path or dict."""
    return read_checkpoint(source, autoencoder_spec=preset_spec("autoencoder", autoencoder_preset),
                           unet_spec=preset_spec("unet", unet_preset))


def load_autoencoder(source: str | os.PathLike, preset: Any = None) -> nn.Module:
    """Our ``AutoencoderKL`` with the weights of ``source`` (see the module docstring), in eval mode."""
    return autoencoder_from(read_any(source, autoencoder_preset=preset), f"the autoencoder of {source}")


def load_unet(source: str | os.PathLike, preset: Any = None, use_ema: bool = True) -> nn.Module:
    """Our ``UNetModel`` with the weights of ``source`` (EMA weights of our checkpoints when ``use_ema``)."""
    return unet_from(read_any(source, unet_preset=preset), use_ema=use_ema, what=f"the U-Net of {source}")


def load_latent_diffusion(source: str | os.PathLike, use_ema: bool = True) -> LatentDiffusion:
    """Everything sampling needs from a stage-2 checkpoint of ours or any of its exports."""
    ckpt = read_checkpoint(source)
    if ckpt["ldm"].get("stage") != "ldm":
        raise ValueError(f"{source} is a {ckpt['ldm'].get('stage')!r} checkpoint; sampling needs a stage-2 checkpoint "
                         "(train.py stage=ldm writes one) or one of its exports (python -m ldm.export)")
    return build_latent_diffusion(ckpt, use_ema=use_ema)


# ------------------------------------------------------------------------------------------------- export

def export_state(ckpt: dict[str, Any], weights: str = "ema") -> tuple[dict[str, Tensor], str]:
    """The weights an export holds (``autoencoder.*``, ``unet.*``, ``text_encoder.*``) and which were taken.

    ``weights``: ``ema`` (the EMA weights of the trained model, when the run kept them) or ``raw``.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights={weights!r}: use ema or raw")
    state, stage = ckpt["state_dict"], ckpt["ldm"]["stage"]
    trained = "autoencoder" if stage == "autoencoder" else "unet"
    has_ema = any(k.startswith(f"{trained}_ema.") for k in state)
    if weights == "ema" and not has_ema:
        log.warning("this checkpoint holds no EMA weights of the %s: exporting the raw ones", trained)
    taken = "ema" if weights == "ema" and has_ema else "raw"
    out = {}
    for part in ("autoencoder", "unet", "text_encoder"):
        src = f"{part}_ema." if part == trained and taken == "ema" else f"{part}."
        out.update({f"{part}.{k[len(src):]}": v for k, v in state.items() if k.startswith(src)})
    return out, taken


def _cast(state: dict[str, Tensor], dtype: str | None) -> dict[str, Tensor]:
    if dtype is None:
        return {k: v.contiguous() for k, v in state.items()}
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use null (keep), {', '.join(DTYPES)}")
    return {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _save_safetensors(state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # clone: tensors of one storage (EMA copies, views) cannot be saved side by side
    atomic_write(path, lambda tmp: save_file({k: v.clone() for k, v in state.items()}, tmp, metadata=metadata))


def _part(state: dict[str, Tensor], part: str) -> dict[str, Tensor]:
    return {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}


def _ae_spec(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["autoencoder"]["config"] if meta["stage"] == "ldm" else meta["config"]["autoencoder"]


def scheduler_config(loss: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``DDIMScheduler`` config for our diffusion loss config (schedule, steps, objective)."""
    schedule, steps = loss.get("schedule", "linear"), int(loss.get("num_timesteps", 1000))
    if schedule not in _BETA_SCHEDULES:
        raise ValueError(f"schedule {schedule!r} has no diffusers counterpart")
    betas = make_betas(schedule, steps, **(loss.get("schedule_kwargs") or {}))
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": steps,
            "beta_schedule": _BETA_SCHEDULES[schedule], "beta_start": float(betas[0]), "beta_end": float(betas[-1]),
            "prediction_type": _PREDICTION[loss.get("objective", "eps")], "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def write_diffusers_vae(folder: Path, ae: dict[str, Tensor], spec: dict[str, Any], stats: dict[str, Any] | None = None,
                        latent_norm: str = "scale") -> None:
    """A diffusers ``AutoencoderKL`` folder for our autoencoder weights ``ae`` (CompVis names) of architecture
    ``spec``; ``stats``: its latent statistics (``scaling_factor`` = ``scale``, ``shift_factor`` = ``shift``)."""
    if stats is None:
        log.warning("no latent statistics in this checkpoint: diffusers' scaling_factor is written as 1.0")
    config = vae_diffusers_config(spec, (stats or {}).get("scale", 1.0), (stats or {}).get("shift", 0.0))
    if latent_norm == "channel" and stats:  # SDXL-style per-channel statistics; StableDiffusionPipeline ignores them
        config.update(latents_mean=stats["mean"], latents_std=stats["std"])
        log.warning("latent_norm=channel: diffusers' StableDiffusionPipeline normalises with scaling_factor only; "
                    "ldm's loader uses the per-channel statistics in ldm.json")
    folder.mkdir(parents=True, exist_ok=True)
    levels, blocks = len(spec["ch_mult"]), int(spec["num_res_blocks"])
    _save_safetensors(vae_to_diffusers(ae, levels, blocks), folder / "diffusion_pytorch_model.safetensors")
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")


def write_diffusers_unet(folder: Path, state: dict[str, Tensor], spec: dict[str, Any], sample_size: int = 64) -> None:
    """A diffusers ``UNet2DConditionModel`` folder for our U-Net weights ``state`` of architecture ``spec``."""
    unet = _meta_module(spec)
    config = unet_diffusers_config(unet, sample_size=sample_size)
    folder.mkdir(parents=True, exist_ok=True)
    blocks = unet.num_res_blocks[0]
    converted = unet_to_diffusers(state, len(unet.channel_mult), blocks, attention_levels(spec),
                                  class_embedding=unet.num_classes is not None)
    _save_safetensors(converted, folder / "diffusion_pytorch_model.safetensors")
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")


def _meta_module(spec: dict[str, Any]) -> nn.Module:
    from ldm.checkpoint import instantiate

    with torch.device("meta"):  # the architecture only: no memory, no init
        return instantiate(dict(spec))


def export_diffusers(state: dict[str, Tensor], meta: dict[str, Any], out: Path) -> Path:
    """Stage 1: an ``AutoencoderKL`` folder. Stage 2: a pipeline folder (``vae/``, ``unet/``, ``scheduler/``,
    ``model_index.json``) that ``DiffusionPipeline.from_pretrained`` assembles (text encoder and tokenizer left
    empty: ours are not diffusers components; pass them or ``prompt_embeds``). Both carry ``ldm.json`` (and
    ``ldm_text_encoder.safetensors``) so that ldm rebuilds the exact model from the folder alone."""
    spec = _ae_spec(meta)
    stats, norm = meta.get("latent_stats"), meta.get("latent_norm", "scale")
    if meta["stage"] == "autoencoder":
        write_diffusers_vae(out, _part(state, "autoencoder"), spec, stats, norm)
    else:
        write_diffusers_vae(out / "vae", _part(state, "autoencoder"), spec, stats, norm)
        latent = meta.get("latent_shape") or [4, 64, 64]
        write_diffusers_unet(out / "unet", _part(state, "unet"), meta["config"]["unet"], int(latent[-1]))
        (out / "scheduler").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "scheduler" / "scheduler_config.json",
                          json.dumps(scheduler_config(meta["config"]["loss"]), indent=2) + "\n")
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                 "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": [None, None],
                 "tokenizer": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
                 "image_encoder": [None, None], "requires_safety_checker": False}
        atomic_write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")
        if text := _part(state, "text_encoder"):
            _save_safetensors(text, out / "ldm_text_encoder.safetensors")
    atomic_write_text(out / EXPORT_META, json.dumps(meta, indent=2, default=str) + "\n")
    return out


def export_compvis(state: dict[str, Tensor], meta: dict[str, Any], out: Path) -> Path:
    """One file like the paper's releases: ``first_stage_model.`` / ``model.diffusion_model.`` (and our text
    encoder under ``cond_stage_model.``); a stage-1 model is written as a standalone CompVis autoencoder.
    ``.safetensors`` keeps our metadata as a string entry, ``.ckpt`` as a plain dict beside ``state_dict``."""
    if meta["stage"] == "autoencoder":
        flat = _part(state, "autoencoder")
    else:
        flat = {}
        for part, prefix in (("autoencoder", COMPVIS_AE), ("unet", COMPVIS_UNET), ("text_encoder", COMPVIS_COND)):
            flat.update({prefix + k: v for k, v in _part(state, part).items()})
    if out.suffix == ".safetensors":
        _save_safetensors(flat, out, {EXPORT_KEY: json.dumps(meta, default=str)})
    elif out.suffix in (".ckpt", ".pt", ".pth"):
        atomic_torch_save({"state_dict": flat, EXPORT_KEY: json.loads(json.dumps(meta, default=str))}, out)
    else:
        raise ValueError(f"out={out}: a compvis export is a .safetensors or .ckpt file")
    return out


def export(ckpt: str | os.PathLike, fmt: str, out: str | os.PathLike, weights: str = "ema",
           dtype: str | None = None) -> Path:
    """Export the checkpoint ``ckpt`` (ours: stage 1 or 2) as ``fmt`` (``FORMATS``) to ``out``; returns ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: use one of {list(FORMATS)}")
    source = read_checkpoint(ckpt)
    if source["ldm"].get("stage") not in ("autoencoder", "ldm"):
        raise ValueError(f"{ckpt} is not a checkpoint trained by ldm (stage {source['ldm'].get('stage')!r})")
    state, taken = export_state(source, weights)
    state = _cast(state, dtype)
    meta = {k: v for k, v in source["ldm"].items() if k != "source"}
    meta.update(format=EXPORT_FORMAT, version=1, weights=taken, dtype=dtype, exported_from=Path(ckpt).name)
    out = Path(out)
    if fmt == "safetensors":
        if out.suffix != ".safetensors":
            raise ValueError(f"out={out}: a safetensors export is a .safetensors file (its config goes beside it)")
        _save_safetensors(state, out)
        atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2, default=str) + "\n")
    elif fmt == "diffusers":
        export_diffusers(state, meta, out)
    else:
        export_compvis(state, meta, out)
    log.info("exported %s (%s weights, %s) as %s to %s", ckpt, taken, dtype or "stored dtype", fmt, out)
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    path = export(cfg.ckpt, cfg.format, cfg.out, weights=cfg.weights, dtype=cfg.dtype)
    print(path)


if __name__ == "__main__":
    main()
