"""Import pretrained weights (Stable Diffusion / CompVis / diffusers) and export ours to safetensors, diffusers and
the CompVis single-file layout.

    python -m ldm.export ckpt=outputs/ldm/<run>/checkpoints/last.ckpt format=diffusers out=exports/my-ldm
    python -m ldm.export ckpt=... format=safetensors out=exports/my-ldm.safetensors weights=ema dtype=float16
    python -m ldm.export ckpt=... format=compvis out=exports/my-ldm.ckpt

Python API (any source ``ldm.checkpoint`` reads: our checkpoints and exports, CompVis/SD single files,
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
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import Tensor, nn

from ldm.atomic import atomic_write, atomic_write_text
from ldm.checkpoint import (
    COMPVIS_AE,
    COMPVIS_COND,
    COMPVIS_UNET,
    EXPORT_FORMAT,
    EXPORT_KEY,
    EXPORT_META,
    architecture,
    atomic_torch_save,
    check_spec,
    check_stored_config,
    instantiate,
    load_latent_diffusion,  # noqa: F401  (re-exported: sample.py and users import it from here)
    read_checkpoint,
    submodule_state,
)
from ldm.checkpoint import load_autoencoder as _load_autoencoder
from ldm.checkpoint import load_unet as _load_unet
from ldm.cli import check_arguments, user_errors
from ldm.diffusion.schedules import make_betas
from ldm.interop.configs import (
    DIFFUSERS_VERSION,
    KL_TARGET,
    VQ_TARGET,
    attention_levels,
    unet_diffusers_config,
    vae_diffusers_config,
)
from ldm.interop.keymaps import unet_to_diffusers, vae_to_diffusers
from ldm.runtime import storage_dtype

log = logging.getLogger("ldm.export")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FORMATS = ("safetensors", "diffusers", "compvis")
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
    check_spec(spec, key=group, origin=str(path))  # builds only ldm's registered classes, like a checkpoint
    return spec


def pretrained_source(cfg: DictConfig, key: str) -> str | None:
    """The source a config gives as ``key`` (e.g. ``autoencoder.pretrained``); None when unset (null or ???)."""
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    return None if value is None else str(value)


def read_any(source: str | os.PathLike, autoencoder_preset: Any = None, unet_preset: Any = None) -> dict[str, Any]:
    """``ldm.checkpoint.read_checkpoint`` with presets given by name, path or dict."""
    return read_checkpoint(source, autoencoder_spec=preset_spec("autoencoder", autoencoder_preset),
                           unet_spec=preset_spec("unet", unet_preset))


def load_autoencoder(source: str | os.PathLike, preset: Any = None) -> nn.Module:
    """Our ``AutoencoderKL`` with the weights of ``source`` (see the module docstring), in eval mode."""
    return _load_autoencoder(source, spec=preset_spec("autoencoder", preset))


def load_unet(source: str | os.PathLike, preset: Any = None, use_ema: bool = True) -> nn.Module:
    """Our ``UNetModel`` with the weights of ``source`` (EMA weights of our checkpoints when ``use_ema``)."""
    return _load_unet(source, spec=preset_spec("unet", preset), use_ema=use_ema)


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
    target = storage_dtype(dtype, "dtype", why=" or null (keep the stored dtype)")
    return {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _save_safetensors(state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # clone: tensors of one storage (EMA copies, views) cannot be saved side by side
    atomic_write(path, lambda tmp: save_file({k: v.clone() for k, v in state.items()}, tmp, metadata=metadata))


def _ae_spec(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["autoencoder"]["config"] if meta["stage"] == "ldm" else meta["config"]["autoencoder"]


def scheduler_config(loss: dict[str, Any]) -> dict[str, Any]:
    """diffusers ``DDIMScheduler`` config for our diffusion loss config (schedule, steps, objective)."""
    schedule, steps = loss.get("schedule", "linear"), int(loss.get("num_timesteps", 1000))
    if schedule not in _BETA_SCHEDULES:
        raise ValueError(f"schedule {schedule!r} has no diffusers counterpart")
    betas = make_betas(schedule, steps, **(loss.get("schedule_kwargs") or {}))
    # trailing spacing and a last step to alpha = 1: the steps ldm's own ddim sampler takes; custom schedule
    # arguments have no diffusers name, so their betas are written out (trained_betas overrides beta_schedule)
    custom = {"trained_betas": [float(b) for b in betas]} if loss.get("schedule_kwargs") else {}
    return {**custom, "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": steps,
            "beta_schedule": _BETA_SCHEDULES[schedule], "beta_start": float(betas[0]), "beta_end": float(betas[-1]),
            "prediction_type": _PREDICTION[loss.get("objective", "eps")], "clip_sample": False,
            "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing"}


def fold_latent_norm(ae: dict[str, Tensor], stats: dict[str, Any],
                     latent_norm: str = "scale") -> tuple[dict[str, Tensor], float]:
    """Autoencoder weights whose latent space is already shifted (and, for ``channel``, normalised), and the
    ``scaling_factor`` that remains, so that ``StableDiffusionPipeline`` (which multiplies by scaling_factor and
    knows no shift) sees exactly ldm's normalised latents.

    The encoder's ``quant_conv`` emits (mean, logvar): ``scale`` subtracts the shift from the mean's bias;
    ``channel`` maps the mean to (mean - m_c) / s_c and the log-variance to logvar - 2 log s_c. ``post_quant_conv``
    undoes it before the decoder (its weight and bias absorb the affine map), so decoding is unchanged.
    """
    quant_w, quant_b = ae["quant_conv.weight"].double(), ae["quant_conv.bias"].double()
    post_w, post_b = ae["post_quant_conv.weight"].double(), ae["post_quant_conv.bias"].double()
    c = post_w.shape[1]
    f64 = torch.float64
    if latent_norm == "channel":  # exported latent = (z - m_c) / s_c, scaling_factor 1
        offset, mult = torch.tensor(stats["mean"], dtype=f64), 1.0 / torch.tensor(stats["std"], dtype=f64)
        scaling = 1.0
    else:  # exported latent = z - shift, scaling_factor = scale
        offset, mult = torch.full((c,), float(stats["shift"]), dtype=f64), torch.ones(c, dtype=f64)
        scaling = float(stats["scale"])
    quant_w, quant_b = quant_w.clone(), quant_b.clone()
    quant_w[:c] *= mult[:, None, None, None]
    quant_b[:c] = (quant_b[:c] - offset) * mult
    quant_b[c:] += 2 * torch.log(mult)  # the log-variance of mult * z
    new_post_b = post_b + (post_w[:, :, 0, 0] @ offset)
    new_post_w = post_w / mult[None, :, None, None]
    out = dict(ae)
    dtype = ae["quant_conv.weight"].dtype
    out.update({"quant_conv.weight": quant_w.to(dtype), "quant_conv.bias": quant_b.to(dtype),
                "post_quant_conv.weight": new_post_w.to(dtype), "post_quant_conv.bias": new_post_b.to(dtype)})
    return out, scaling


def write_diffusers_vae(folder: Path, ae: dict[str, Tensor], spec: dict[str, Any], stats: dict[str, Any] | None = None,
                        latent_norm: str = "scale") -> bool:
    """A diffusers ``AutoencoderKL`` folder for our autoencoder weights ``ae`` (CompVis names) of architecture
    ``spec``. With latent statistics ``stats`` their shift (``channel``: per-channel affine map) is folded into the
    weights (``fold_latent_norm``) and ``scaling_factor`` set, so diffusers' pipelines get ldm's latents; returns
    whether the weights were changed by folding."""
    folded = False
    scaling = 1.0
    if stats is None:
        log.warning("no latent statistics in this checkpoint: diffusers' scaling_factor is written as 1.0")
    elif latent_norm == "channel" or float(stats.get("shift", 0.0)) != 0.0:
        ae, scaling = fold_latent_norm(ae, stats, latent_norm)
        folded = True
    else:
        scaling = float(stats["scale"])
    config = vae_diffusers_config(spec, scaling, 0.0)
    folder.mkdir(parents=True, exist_ok=True)
    levels, blocks = len(spec["ch_mult"]), int(spec["num_res_blocks"])
    _save_safetensors(vae_to_diffusers(ae, levels, blocks), folder / "diffusion_pytorch_model.safetensors")
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folded


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
    with torch.device("meta"):  # the architecture only: no memory, no init
        return instantiate(architecture(spec), key="config.unet")


def _write_text_encoder(out: Path, meta: dict[str, Any]) -> tuple[list, list]:
    """``text_encoder/`` + ``tokenizer/`` for a frozen Hugging Face CLIP encoder (last layer: what
    StableDiffusionPipeline feeds its U-Net); model_index.json entries, ``[None, None]`` for other encoders."""
    spec = meta["config"].get("text_encoder") or {}
    if str(spec.get("_target_", "")).endswith("ClassEncoder"):
        log.warning("a class-conditional model: diffusers' text-to-image pipeline has no component for its class "
                    "embedding, so text_encoder/tokenizer stay empty; the embedding is in ldm_text_encoder.safetensors "
                    "(one context token per label, row num_classes = the null class). Feed it as prompt_embeds, or "
                    "load the folder with ldm.export's readers (sample.py ckpt=<folder>)")
        return [None, None], [None, None]
    if not str(spec.get("_target_", "")).endswith(("HFTextEncoder", "hf_text_encoder")) or \
            spec.get("layer", "last") != "last":
        log.info("text encoder %s is not a diffusers pipeline component: text_encoder/tokenizer left empty "
                 "(pass prompt_embeds, or your own)", spec.get("_target_"))
        return [None, None], [None, None]
    try:
        encoder = instantiate(dict(spec), key="config.text_encoder")
    except (OSError, ValueError) as err:
        log.warning("could not load the text encoder %s to export it (%s): text_encoder/tokenizer left empty",
                    spec.get("name_or_path"), err)
        return [None, None], [None, None]
    if encoder.model_type not in ("clip", "clip_text_model"):
        return [None, None], [None, None]
    encoder.model.save_pretrained(out / "text_encoder")
    encoder.tokenizer.model_max_length = encoder.max_length  # the pipeline pads prompts to it, as ldm did
    encoder.tokenizer.save_pretrained(out / "tokenizer")
    return ["transformers", type(encoder.model).__name__], ["transformers", type(encoder.tokenizer).__name__]


def export_diffusers(state: dict[str, Tensor], meta: dict[str, Any], out: Path) -> Path:
    """Stage 1: an ``AutoencoderKL`` folder. Stage 2: a ``StableDiffusionPipeline`` folder (``vae/``, ``unet/``,
    ``scheduler/`` with ldm's DDIM steps, ``model_index.json``; ``text_encoder/`` + ``tokenizer/`` for a frozen CLIP
    encoder, else empty: pass ``prompt_embeds``). The latent normalisation is folded into the exported VAE, so
    diffusers' pipelines see ldm's latents; ``ldm.json`` (+ ``ldm_autoencoder.safetensors``, the unfolded weights,
    + ``ldm_text_encoder.safetensors``, a trained text encoder) let ldm rebuild the exact model. The folder is
    written under a temporary name and renamed: it is never left half-written."""
    out = Path(out)
    if (target := _ae_spec(meta).get("_target_")) != KL_TARGET:
        kind = "a VQ autoencoder" if target == VQ_TARGET else "the identity first stage (pixel space)"
        raise ValueError(f"format=diffusers writes an AutoencoderKL (and a StableDiffusionPipeline), which {kind} is "
                         "not: export it with format=safetensors or format=compvis, which ldm reads back")
    if out.exists() and not (out / EXPORT_META).is_file():
        raise ValueError(f"out={out} exists and is not an earlier ldm export (no {EXPORT_META}): choose a new folder "
                         "(an export replaces its folder as a whole)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        spec = _ae_spec(meta)
        stats, norm = meta.get("latent_stats"), meta.get("latent_norm", "scale")
        ae = submodule_state(state, "autoencoder")
        if write_diffusers_vae(tmp if meta["stage"] == "autoencoder" else tmp / "vae", ae, spec, stats, norm):
            _save_safetensors(ae, tmp / "ldm_autoencoder.safetensors")
        if meta["stage"] == "ldm":
            latent = meta.get("latent_shape") or [4, 64, 64]
            write_diffusers_unet(tmp / "unet", submodule_state(state, "unet"), meta["config"]["unet"], int(latent[-1]))
            (tmp / "scheduler").mkdir()
            atomic_write_text(tmp / "scheduler" / "scheduler_config.json",
                              json.dumps(scheduler_config(meta["config"]["loss"]), indent=2) + "\n")
            text_entry, tokenizer_entry = _write_text_encoder(tmp, meta)
            index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                     "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
                     "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": text_entry,
                     "tokenizer": tokenizer_entry, "safety_checker": [None, None], "feature_extractor": [None, None],
                     "image_encoder": [None, None], "requires_safety_checker": False}
            atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2) + "\n")
            if (text := submodule_state(state, "text_encoder")) and text_entry[0] is None:
                _save_safetensors(text, tmp / "ldm_text_encoder.safetensors")
        atomic_write_text(tmp / EXPORT_META, json.dumps(meta, indent=2, default=str) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_compvis(state: dict[str, Tensor], meta: dict[str, Any], out: Path) -> Path:
    """One file like the paper's releases: ``first_stage_model.`` / ``model.diffusion_model.`` (and our text
    encoder under ``cond_stage_model.``); a stage-1 model is written as a standalone CompVis autoencoder.
    ``.safetensors`` keeps our metadata as a string entry, ``.ckpt`` as a plain dict beside ``state_dict``."""
    if meta["stage"] == "autoencoder":
        flat = submodule_state(state, "autoencoder")
    else:
        flat = {}
        for part, prefix in (("autoencoder", COMPVIS_AE), ("unet", COMPVIS_UNET), ("text_encoder", COMPVIS_COND)):
            flat.update({f"{prefix}.{k}": v for k, v in submodule_state(state, part).items()})
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
    if "source" in source["ldm"] or source["ldm"].get("stage") not in ("autoencoder", "ldm"):
        raise ValueError(f"{ckpt} is not a checkpoint trained by ldm but a {source['ldm'].get('source', {}).get('format')}"
                         " release: export converts ldm's checkpoints (train with it, e.g. stage 2 on this autoencoder, "
                         "then export the run's checkpoint)")
    state, taken = export_state(source, weights)
    state = _cast(state, dtype)
    meta = {k: v for k, v in source["ldm"].items() if k != "source"}
    meta.update(format=EXPORT_FORMAT, version=1, weights=taken, dtype=dtype, exported_from=Path(ckpt).name)
    check_stored_config(meta, str(ckpt))  # an export carries only configs that build ldm's registered classes
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
@user_errors("python -m ldm.export")
def main(cfg: DictConfig) -> None:
    path = export(cfg.ckpt, cfg.format, cfg.out, weights=cfg.weights, dtype=cfg.dtype)
    print(path)


if __name__ == "__main__":
    check_arguments("export", "python -m ldm.export")
    main()
