"""What train.py fits, per stage: the Lightning module and its data, built from the composed config.

- ``build_autoencoder_stage``: stage 1 (autoencoder, loss with LPIPS and PatchGAN, image data).
- ``build_ldm_stage``: stage 2 (the frozen autoencoder, ours or pretrained; the latent cache, built when missing
  by ``ensure_cache`` in ``default_cache_dir``; the U-Net, optionally from pretrained weights; the condition
  encoder).
- ``write_latent_stats``: after stage 1, the latent statistics stage 2 needs, in ``last.ckpt`` and the best one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ldm.cache import build_cache
from ldm.checkpoint import (
    add_latent_stats,
    architecture,
    build_autoencoder,
    read_stage1_checkpoint,
    strict_load,
    with_latent_stats,
)
from ldm.config_checks import check_classes, check_labels
from ldm.data.latent_format import autoencoder_identity, check_cache_compatible, read_manifest
from ldm.export import load_unet, pretrained_source, read_any
from ldm.models.latent_stats import channel_spread_problem
from ldm.runtime import resolve_device

log = logging.getLogger("ldm.train")


def latents_on_gpu(cfg: DictConfig) -> bool:
    """``latent_data.on_gpu``; ``auto``: on when the run trains on CUDA (in-memory latents gathered on the GPU)."""
    value = cfg.latent_data.get("on_gpu", False)
    if value == "auto":
        return str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return bool(value)


def build_autoencoder_stage(cfg: DictConfig, config: dict):
    data = instantiate(cfg.data)
    autoencoder = instantiate(cfg.autoencoder)
    loss = instantiate(cfg.loss)
    # partial first: the stored run config holds `_target_`s that Hydra must not build
    module = instantiate(cfg.module, _partial_=True)(autoencoder=autoencoder, loss=loss, run_config=config)
    return module, data


def default_cache_dir(cfg: DictConfig, identity: str) -> Path:
    """``<paths.latent_cache_root>/<dataset>-<res>px-<autoencoder sha[:12]>-<data config sha[:8]>``: a new
    autoencoder, resolution or data setting gets its own cache, and the same ones reuse it."""
    dataset = OmegaConf.to_container(cfg.data, resolve=True).get("dataset", {})  # what decides the images
    name = str(dataset.get("_target_", "data")).rsplit(".", 1)[-1].lower().removesuffix("dataset")
    data_sha = hashlib.sha256(json.dumps(dataset, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.paths.latent_cache_root) / f"{name or 'data'}-{cfg.resolution}px-{identity[:12]}-{data_sha}"


def ensure_cache(cfg: Any, ae_ckpt: dict[str, Any], ae_source: str, identity: str, text_encoder: Any) -> Path:
    """The latent cache train.py stage=ldm trains on: ``cache_dir``, or the default folder of this autoencoder,
    resolution and data (``default_cache_dir``); built here when it holds no manifest yet."""
    cache_dir = Path(cfg.cache_dir or default_cache_dir(cfg, identity))
    if not (cache_dir / "manifest.json").is_file():
        data = instantiate(cfg.data)
        check_labels(cfg, text_encoder, data.dataset("train"), "the training images")
        log.info("no latent cache in %s: building it now (python -m ldm.cache does this on its own)", cache_dir)
        # its random draws must not shift the model's initialisation: same seed, same run, cache built or not
        with torch.random.fork_rng():
            ae_ckpt = read_stage1_checkpoint(ae_ckpt)  # checks that a checkpoint of ours holds its statistics
            device = resolve_device("cpu" if str(cfg.trainer.accelerator) == "cpu" else "auto")
            ae_ckpt = with_latent_stats(ae_ckpt, data, int(cfg.latent_stats_images), device, int(cfg.seed),
                                        cfg.autoencoder_latent_scale)
            build_cache(ae_ckpt, data, cache_dir, ckpt_path=ae_source, **cfg.cache)
    return cache_dir




def build_ldm_stage(cfg: DictConfig, config: dict):
    """Frozen autoencoder (a stage-1 run of ours or a pretrained one), the latent cache (built here when missing),
    U-Net (optionally from pretrained weights), condition encoder."""
    ae_source, unet_source = pretrained_source(cfg, "autoencoder.pretrained"), pretrained_source(cfg, "unet.pretrained")
    if ae_source is None:
        raise ValueError("stage=ldm needs the autoencoder: autoencoder.pretrained=<stage-1 checkpoint or pretrained "
                         "autoencoder>")
    ae_ckpt = read_any(ae_source, autoencoder_preset=cfg.autoencoder_preset)
    if ae_ckpt["ldm"]["stage"] != "autoencoder":
        raise ValueError(f"autoencoder.pretrained={ae_source} is a {ae_ckpt['ldm']['stage']!r} checkpoint; "
                         "stage 2 needs a stage-1 (autoencoder) checkpoint or a pretrained autoencoder")
    autoencoder, stats = build_autoencoder(ae_ckpt)
    spec = architecture(OmegaConf.to_container(cfg.unet, resolve=True))
    c = autoencoder.latent_channels  # before the cache is built: a wrong U-Net width is named at once
    if (spec.get("in_channels"), spec.get("out_channels")) != (c, c):
        raise ValueError(f"unet.in_channels={spec.get('in_channels')} and unet.out_channels="
                         f"{spec.get('out_channels')}, but the autoencoder's latents have {c} channels: set "
                         f"unet.in_channels={c} unet.out_channels={c}")
    # read (and checked) before any work; copied into the configured U-Net below
    with torch.random.fork_rng():  # its throwaway initialisation must not shift the seeded ones below
        pretrained_unet = load_unet(unet_source, preset=spec) if unet_source is not None else None
    identity = autoencoder_identity(autoencoder)
    text_encoder = instantiate(cfg.text_encoder)
    cache_dir = ensure_cache(cfg, ae_ckpt, ae_source, identity, text_encoder)
    manifest = read_manifest(cache_dir)
    if stats is None and manifest.get("autoencoder", {}).get("identity") == identity:
        stats = manifest["latent_stats"]  # an imported autoencoder's statistics: measured once, kept in the cache
    if (problem := channel_spread_problem(stats or {}, str(cfg.latent_norm))) is not None:
        log.warning(problem)
    check_classes(text_encoder, manifest, cache_dir)
    data = instantiate(cfg.latent_data, path=str(cache_dir), on_gpu=latents_on_gpu(cfg))
    # cached latents need no loader workers (in memory they are gathered whole, on the GPU without any): Lightning's
    # advice to add workers is noise here (the loader's share of a step is measured: docs/results.md)
    warnings.filterwarnings("ignore", message=r".*dataloader' does not have many workers")
    check_labels(cfg, text_encoder, data.dataset("train"), f"the latent cache {cache_dir}")
    latent_shape = tuple(manifest["latent_shape"])
    f = autoencoder.downsample_factor
    if int(cfg.resolution) % f:
        raise ValueError(f"resolution={cfg.resolution} is not divisible by the autoencoder's downsampling factor {f}; "
                         f"use a multiple of {f} (e.g. {int(cfg.resolution) // f * f})")
    side = int(cfg.resolution) // f  # what this run's images encode to
    check_cache_compatible(manifest, identity, latent_shape=(autoencoder.latent_channels, side, side), stats=stats,
                           text_encoder=text_encoder)
    unet = instantiate(spec)
    if pretrained_unet is not None:  # fine-tuning: the weights must fit the configured architecture
        strict_load(unet, pretrained_unet.state_dict(), f"unet.pretrained={unet_source}")
        del pretrained_unet
        log.info("U-Net initialised from %s", unet_source)
    meta = {"autoencoder": {"ckpt_path": ae_source, "identity": identity,
                            "config": ae_ckpt["ldm"]["config"]["autoencoder"]},
            "cache": {"path": str(cache_dir), "created": manifest.get("created")}}
    if getattr(text_encoder, "input_key", "caption") == "label" and manifest.get("classes"):
        # label -> name (classes.json), so that sample.py takes class names as prompts
        meta["class_names"] = {label: entry.get("name") for label, entry in manifest["classes"]["classes"].items()}
    module = instantiate(cfg.module, _partial_=True)(
        unet=unet, text_encoder=text_encoder, autoencoder=autoencoder, loss=instantiate(cfg.loss),
        latent_stats=stats, latent_shape=latent_shape, run_config=config, meta=meta,
    )
    return module, data


def write_latent_stats(cfg: DictConfig, trainer: Any, data, run_dir: Path) -> None:
    """Store latent statistics, computed with each checkpoint's own weights, in last.ckpt and the best one."""
    ckpt_cb = trainer.checkpoint_callback
    paths = {str(run_dir / "checkpoints" / "last.ckpt")}
    if ckpt_cb is not None and ckpt_cb.best_model_path:
        best = Path(ckpt_cb.best_model_path)
        if best.is_file() and best.parent.resolve() == (run_dir / "checkpoints").resolve():  # this run's files only
            paths.add(str(best))
    device = trainer.strategy.root_device
    for path in sorted(paths):
        images = (batch["image"] for batch in data.train_dataloader())
        stats = add_latent_stats(path, images, int(cfg.latent_stats_images), device=device, seed=cfg.seed)
        log.info("latent stats in %s: scale=%.5f shift=%.4f (%d images)", Path(path).name, stats["scale"],
                 stats["shift"], stats["n_images"])
