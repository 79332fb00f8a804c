"""Read a checkpoint of any origin and bring it into the form of our own checkpoints.

Sources (a path to a file or a folder):
- our training checkpoints (``train.py``'s ``.ckpt``: a Lightning checkpoint with an ``"ldm"`` entry);
- our exports (``python -m ldm.export``): ``x.safetensors`` + ``x.json``; a diffusers folder with ``ldm.json``;
  a CompVis-style single file whose metadata holds ``ldm_export``;
- foreign releases: CompVis / Stable Diffusion single files (``.ckpt`` or ``.safetensors``; autoencoder keys under
  ``first_stage_model.``, U-Net keys under ``model.diffusion_model.``), standalone CompVis autoencoder
  checkpoints (``encoder.*`` / ``decoder.*``) and U-Net state dicts (``input_blocks.*``), and diffusers
  ``AutoencoderKL`` / ``UNet2DConditionModel`` folders or pipeline folders (``vae/``, ``unet/``).

The source ``identity`` (``PIXEL_SPACE``) is no file: it reads as the identity first stage (stage 2 in pixel space).

``read_checkpoint`` returns ``{"state_dict": {"autoencoder.*" | "unet.*" | "text_encoder.*": tensor}, "ldm": meta}``
with meta as ``train.py`` writes it, so ``build_autoencoder`` / ``build_unet`` / ``build_latent_diffusion`` rebuild
the models from it. Foreign autoencoders come without latent statistics (``meta["latent_stats"] is None``); the
scale a diffusers config records is kept in ``meta["source_latent_scale"]``. Files are opened by ``files.py`` only
(pickles with ``weights_only=True``), and a stored config is checked against the registry as soon as it is read,
so a config that names anything but ldm's registered classes is refused naming the key and the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.checkpoint.files import load_safetensors, load_torch_file, read_weights
from ldm.checkpoint.registry import check_spec, check_stored_config
from ldm.interop.configs import (
    KL_TARGET,
    attention_levels,
    infer_vae_kwargs,
    unet_kwargs_from_diffusers,
    vae_kwargs_from_diffusers,
    vae_latent_scale,
)
from ldm.interop.keymaps import unet_from_diffusers, vae_from_diffusers

AE_TARGET = KL_TARGET
UNET_TARGET = "ldm.models.unet.UNetModel"
COMPVIS_AE, COMPVIS_UNET, COMPVIS_COND = "first_stage_model", "model.diffusion_model", "cond_stage_model"  # + "."
EXPORT_META = "ldm.json"  # beside the weights of our diffusers exports; x.json beside x.safetensors
EXPORT_KEY = "ldm_export"  # metadata entry of our CompVis-style single files
EXPORT_FORMAT = "ldm-export"
PIXEL_SPACE = "identity"  # the source name of the identity first stage (stage 2 in pixel space, f = 1)
_AE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
_UNET_ROOTS = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.", "output_blocks.", "out.")


def source_missing(source: str | os.PathLike) -> bool:
    """Whether a checkpoint source names nothing: no such path (``PIXEL_SPACE`` needs none)."""
    return str(source) != PIXEL_SPACE and not Path(source).exists()


def submodule_state(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys under ``prefix.`` with the prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Our training checkpoint (``train.py``'s ``.ckpt``), read without running code and with its stored config
    checked against the registry; anything else is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or "ldm" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not an ldm training checkpoint (no 'ldm' entry with the run config); "
            "pretrained Stable Diffusion / diffusers weights are imported with ldm.export instead"
        )
    check_stored_config(ckpt["ldm"], str(path))
    return ckpt


# ---------------------------------------------------------------------------------------- any -> ours

def read_checkpoint(source: str | os.PathLike, *, autoencoder_spec: dict | None = None,
                    unet_spec: dict | None = None) -> dict[str, Any]:
    """Any source (module docstring) as our checkpoint dict ``{"state_dict", "ldm"}``.

    ``autoencoder_spec`` / ``unet_spec``: ``_target_`` specs that name the architecture of sources without a
    config (CompVis files; sources with a config, ours and diffusers', ignore them); when None the autoencoder is
    inferred from its shapes, and a CompVis U-Net is an error (its weights do not record the attention heads).
    Foreign files give stage-1 checkpoints (autoencoder only) or, with U-Net weights only, ``{"stage": "unet"}``.
    """
    for name, spec in (("autoencoder_spec", autoencoder_spec), ("unet_spec", unet_spec)):
        check_spec(spec, key=name, origin="the architecture given for this source")
    if str(source) == PIXEL_SPACE:  # no file: its statistics are measured on the data, like an import's
        return _stage1({}, {"_target_": "ldm.models.autoencoder.IdentityFirstStage", "in_channels": 3}, PIXEL_SPACE,
                       PIXEL_SPACE)
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a checkpoint file (.ckpt / .safetensors) or a "
                                "diffusers folder")
    tensors, extras = read_weights(path)
    if isinstance(extras.get("ldm"), dict):  # our training checkpoint, as train.py wrote it
        check_stored_config(extras["ldm"], str(path))
        return {"state_dict": tensors, **extras}
    sidecar = path.with_suffix(".json")
    if path.suffix == ".safetensors" and sidecar.is_file() and (meta := _export_meta(sidecar)) is not None:
        return {"state_dict": tensors, "ldm": meta}
    if EXPORT_KEY in extras:  # our CompVis-style export
        meta = extras[EXPORT_KEY]
        meta = json.loads(meta) if isinstance(meta, str) else meta
        check_stored_config(meta, str(path))
        state = {**{f"autoencoder.{k}": v for k, v in submodule_state(tensors, COMPVIS_AE).items()},
                 **{f"unet.{k}": v for k, v in submodule_state(tensors, COMPVIS_UNET).items()},
                 **{f"text_encoder.{k}": v for k, v in submodule_state(tensors, COMPVIS_COND).items()}}
        if meta["stage"] == "autoencoder" and not state:  # stage-1 export: the standalone CompVis layout
            state = {f"autoencoder.{k}": v for k, v in tensors.items()}
        return {"state_dict": state, "ldm": meta}
    return _read_compvis(tensors, str(path), autoencoder_spec, unet_spec)


def _export_meta(path: Path) -> dict[str, Any] | None:
    """The ``ldm.json`` / ``x.json`` of our export (checked against the registry), or None for other JSON files."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        return None
    check_stored_config(meta, str(path))
    return meta


def _stage1(ae_state: dict[str, Tensor], spec: dict[str, Any], source: str, kind: str,
            scale: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"state_dict": {f"autoencoder.{k}": v for k, v in ae_state.items()},
            "ldm": {"stage": "autoencoder", "config": {"autoencoder": spec, "resolution": spec.get("resolution")},
                    "latent_stats": None, "source": {"path": source, "format": kind},
                    "source_latent_scale": scale}}


def _read_compvis(tensors: dict[str, Tensor], source: str, ae_spec: dict | None, unet_spec: dict | None) -> dict:
    # an autoencoder's training leftovers (loss.*: discriminator, LPIPS, log-variance) are dropped
    ae = {k: v for k, v in submodule_state(tensors, COMPVIS_AE).items() if k.startswith(_AE_ROOTS)}
    unet = submodule_state(tensors, COMPVIS_UNET)
    if not ae and not unet and any(k.startswith(_AE_ROOTS) for k in tensors):  # standalone CompVis autoencoder
        ae = {k: v for k, v in tensors.items() if k.startswith(_AE_ROOTS)}  # drops loss.* / model_ema.*
    if not ae and not unet and "input_blocks.0.0.weight" in tensors:  # a bare CompVis U-Net state dict
        unet = {k: v for k, v in tensors.items() if k.startswith(_UNET_ROOTS)}
    if not ae and not unet and any(k.startswith(("down_blocks.", "time_embedding.", "conv_in.")) for k in tensors):
        raise ValueError(f"{source} has diffusers' parameter names (a diffusion_pytorch_model file): pass the folder "
                         "that holds it with its config.json")
    if not ae and not unet:
        raise ValueError(f"{source} holds neither an autoencoder (first_stage_model.* or encoder.*/decoder.*) nor "
                         f"a U-Net (model.diffusion_model.*); its first keys: {sorted(tensors)[:5]}")
    out: dict[str, Any] = {"state_dict": {}, "ldm": {"stage": "unet", "config": {}, "latent_stats": None,
                                                      "source": {"path": source, "format": "compvis"}}}
    if ae:
        out = _stage1(ae, ae_spec or infer_vae_kwargs(ae), source, "compvis")
    if unet:  # its architecture only when named: CompVis files do not record the attention heads
        out["state_dict"].update({f"unet.{k}": v for k, v in unet.items()})
        if unet_spec is not None:
            out["ldm"]["config"]["unet"] = unet_spec
    return out


def _folder_weights(folder: Path) -> dict[str, Tensor]:
    """The weights of a diffusers model folder (single or sharded safetensors, else a torch .bin)."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return read_weights(folder / name)[0]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_safetensors(folder / shard)[0].items()}
    raise FileNotFoundError(f"{folder} has a config.json but no diffusion_pytorch_model weights")


def _read_folder(folder: Path) -> dict[str, Any]:
    meta = _export_meta(folder / EXPORT_META)  # first: a refused config stops before any weights are read
    vae_dir = folder / "vae" if (folder / "vae" / "config.json").is_file() else None
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else None
    if (folder / "config.json").is_file():
        kind = json.loads((folder / "config.json").read_text()).get("_class_name")
        vae_dir = folder if kind == "AutoencoderKL" else vae_dir
        unet_dir = folder if kind == "UNet2DConditionModel" else unet_dir
    if vae_dir is None and unet_dir is None:
        raise ValueError(f"{folder} is not a diffusers model folder (config.json with _class_name AutoencoderKL "
                         "or UNet2DConditionModel) nor a pipeline folder with vae/ or unet/")
    out: dict[str, Any] = {"state_dict": {}, "ldm": {"stage": "unet", "config": {}, "latent_stats": None,
                                                      "source": {"path": str(folder), "format": "diffusers"}}}
    if vae_dir is not None:
        config = json.loads((vae_dir / "config.json").read_text())
        spec = {"_target_": AE_TARGET, **vae_kwargs_from_diffusers(config)}  # its own config names it
        levels, blocks = len(spec["ch_mult"]), int(spec["num_res_blocks"])
        out = _stage1(vae_from_diffusers(_folder_weights(vae_dir), levels, blocks), spec, str(folder), "diffusers",
                      vae_latent_scale(config))
    if unet_dir is not None:
        spec = {"_target_": UNET_TARGET, **unet_kwargs_from_diffusers(json.loads((unet_dir / "config.json").read_text()))}
        levels = len(spec["channel_mult"])
        blocks = spec["num_res_blocks"] if isinstance(spec["num_res_blocks"], int) else spec["num_res_blocks"][0]
        state = unet_from_diffusers(_folder_weights(unet_dir), levels, int(blocks), attention_levels(spec),
                                    class_embedding=spec.get("num_classes") is not None)
        out["state_dict"].update({f"unet.{k}": v for k, v in state.items()})
        out["ldm"]["config"]["unet"] = spec
    if meta is not None:  # our own export: its config, statistics, exact autoencoder weights and text encoder
        out["ldm"] = meta
        for name, part in (("ldm_autoencoder.safetensors", "autoencoder"), ("ldm_text_encoder.safetensors",
                                                                            "text_encoder")):
            if (folder / name).is_file():
                out["state_dict"] = {k: v for k, v in out["state_dict"].items() if not k.startswith(part + ".")}
                out["state_dict"].update({f"{part}.{k}": v for k, v in load_safetensors(folder / name)[0].items()})
    return out


def read_stage1_checkpoint(ckpt: str | os.PathLike | Mapping[str, Any], preset: Any = None) -> dict[str, Any]:
    """A stage-1 checkpoint dict from our training checkpoint or any pretrained autoencoder ``ldm.export``
    imports (an SD / CompVis file, a diffusers folder; ``preset`` names a CompVis file's architecture).

    Our checkpoints must hold latent statistics (train.py stores them when stage 1 finishes); imported
    autoencoders come without them (``latent_stats`` None; ``with_latent_stats`` computes them).
    """
    from ldm.export import read_any  # the Hydra edge that resolves presets

    where = "the given checkpoint" if isinstance(ckpt, Mapping) else str(ckpt)
    if not isinstance(ckpt, Mapping):
        if source_missing(ckpt):
            raise FileNotFoundError(f"{ckpt} does not exist; give a stage-1 checkpoint, e.g. "
                                    "outputs/autoencoder/<run>/checkpoints/last.ckpt (written by python train.py), "
                                    "or a pretrained autoencoder (SD / CompVis file, diffusers folder)")
        ckpt = read_any(ckpt, autoencoder_preset=preset)
    stage = ckpt["ldm"].get("stage")
    if stage != "autoencoder":
        raise ValueError(f"{where} is a {stage!r} checkpoint; the latent cache needs a stage-1 (autoencoder) "
                         "checkpoint, e.g. outputs/autoencoder/<run>/checkpoints/last.ckpt")
    if not ckpt["ldm"].get("latent_stats") and "source" not in ckpt["ldm"]:
        raise ValueError(f"{where} has no latent statistics (ckpt['ldm']['latent_stats']). train.py stores them "
                         "when stage-1 training finishes: finish the run (resume=auto), or add them with "
                         "ldm.checkpoint.add_latent_stats(path, image_batches, n_images)")
    return dict(ckpt)
