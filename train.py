"""Train either stage of ldm from a Hydra config.

    python train.py                                   # stage 1 quickstart: tiny KL-VAE on `shapes`, CPU or GPU
    python train.py experiment=paper/kl_f8 trainer=ddp  # the paper's KL-f8 autoencoder on every GPU
    python train.py run_name=exp1 resume=auto         # continue outputs/autoencoder/exp1 where it stopped
    python train.py stage=ldm autoencoder.pretrained=outputs/autoencoder/exp1/checkpoints/last.ckpt   # stage 2

Reads top to bottom: check the config, build data / model / loss for the stage, fit, then (stage 1) store the
latent statistics in the checkpoints for stage 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.cache import build_cache, read_stage1_checkpoint, with_latent_stats
from ldm.checkpoint import add_latent_stats, architecture, build_autoencoder, strict_load
from ldm.data.latent_format import autoencoder_identity, check_cache_compatible, read_manifest
from ldm.data.latents import channel_spread_problem
from ldm.distributed import resolve_device
from ldm.export import load_unet, pretrained_source, read_any
from ldm.lit.callbacks import AtomicCheckpointIO
from ldm.losses.lpips import lpips_min_input_size
from ldm.models.discriminator import patchgan_min_input_size

log = logging.getLogger("ldm.train")


def auto_precision(accelerator: str = "auto") -> str:
    """bf16 autocast on GPUs that have it, fp16 autocast on older GPUs, fp32 on the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_config(cfg: DictConfig) -> None:
    """Reject impossible settings before any work starts, naming the key and the fix."""
    problems = []
    if cfg.stage_name == "ldm":
        problems += _ldm_problems(cfg)
    else:
        problems += _autoencoder_problems(cfg)
    if int(cfg.batch_size) < 1:
        problems.append(f"batch_size={cfg.batch_size} must be >= 1")
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        problems.append("trainer asks for GPUs but CUDA is not available; use trainer=cpu (or trainer=default)")
    if cfg.resume not in (None, "auto"):
        problems.append(f"resume={cfg.resume!r}: use resume=auto, or ckpt_path=<file> for a given checkpoint")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        problems.append(f"ckpt_path={cfg.ckpt_path} does not exist")
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))


# stage 2's pretrained sources: (the key, its older spelling); either works, both must agree
AUTOENCODER_KEYS = ("autoencoder.pretrained", "autoencoder_ckpt")
UNET_KEYS = ("unet.pretrained", "unet_pretrained")


def _ldm_problems(cfg: DictConfig) -> list[str]:
    problems = []
    for keys in (AUTOENCODER_KEYS, UNET_KEYS):
        try:
            source, key = pretrained_source(cfg, *keys)
        except ValueError as err:
            problems.append(str(err))
            continue
        if source is None and keys == AUTOENCODER_KEYS:
            problems.append("stage=ldm needs the stage-1 checkpoint: autoencoder.pretrained=outputs/autoencoder/<run>/"
                            "checkpoints/last.ckpt (train one with `python train.py`; older spelling: "
                            "autoencoder_ckpt=), or a pretrained autoencoder")
        elif source is not None and not Path(source).exists():
            problems.append(f"{key}={source} does not exist")
    if cfg.latent_norm not in ("scale", "channel"):
        problems.append(f"latent_norm={cfg.latent_norm!r}: use scale or channel")
    return problems


def _autoencoder_problems(cfg: DictConfig) -> list[str]:
    problems = []
    ch_mult = list(cfg.autoencoder.get("ch_mult", [1]))
    factor = 2 ** (len(ch_mult) - 1)
    res = int(cfg.resolution)
    if res <= 0 or res % factor:
        ok = max(factor, res // factor * factor)
        problems.append(
            f"resolution={res} is not divisible by the autoencoder's downsampling factor {factor} "
            f"(ch_mult={ch_mult}); use e.g. resolution={ok} or another autoencoder preset"
        )
    n_layers = int(cfg.loss.discriminator.get("n_layers", 3))
    if res < patchgan_min_input_size(n_layers):
        problems.append(
            f"resolution={res} is too small for a {n_layers}-layer PatchGAN (needs >= "
            f"{patchgan_min_input_size(n_layers)}); lower loss.discriminator.n_layers"
        )
    perceptual = cfg.loss.get("perceptual")
    if perceptual is not None:
        net = str(perceptual.get("net", "vgg"))
        if res < lpips_min_input_size(net):
            problems.append(f"resolution={res} is too small for LPIPS-{net} (needs >= {lpips_min_input_size(net)})")
    if cfg.monitor == "val/lpips" and perceptual is None:
        problems.append("monitor=val/lpips needs an LPIPS net (loss.perceptual); set monitor=val/rec_loss")
    return problems


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path is not None:
        return str(cfg.ckpt_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume == "auto" and last.is_file():
        log.info("resume=auto: continuing from %s", last)
        return str(last)
    if cfg.resume == "auto":
        log.info("resume=auto: no %s yet, starting a new run", last)
    return None


def one_spelling(cfg: DictConfig) -> None:
    """Keep each stage-2 pretrained source under its main key only (the older spelling set to null), so the stored
    run config reads the same whichever spelling the command used, and a later override of the main key alone
    does not meet a stale copy."""
    with open_dict(cfg):
        for key, older in (AUTOENCODER_KEYS, UNET_KEYS):
            source, _ = pretrained_source(cfg, key, older)
            OmegaConf.update(cfg, key, source)
            OmegaConf.update(cfg, older, None)


def train(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg)
    if cfg.stage_name == "ldm":
        one_spelling(cfg)
    if cfg.trainer.precision == "auto":
        with open_dict(cfg):
            cfg.trainer.precision = auto_precision(str(cfg.trainer.accelerator))
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)  # stored in every checkpoint

    build = build_ldm_stage if cfg.stage_name == "ldm" else build_autoencoder_stage
    module, data = build(cfg, config)

    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    log.info("run directory: %s", run_dir)
    log.info("data: %s", data.describe())
    trainer.fit(
        module,
        train_dataloaders=data.train_dataloader(),
        val_dataloaders=data.val_dataloader(),
        ckpt_path=resume_path(cfg, run_dir),
    )

    if not cfg.trainer.fast_dev_run:
        # Lightning saves `last.ckpt` after validations; a run that stops on max_steps between two
        # validations would lose its final steps. Save the final state explicitly (all ranks must call this).
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)  # the full state: resumable
        if trainer.is_global_zero and cfg.stage_name == "autoencoder":
            write_latent_stats(cfg, trainer, data, run_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def build_autoencoder_stage(cfg: DictConfig, config: dict):
    data = instantiate(cfg.data)
    autoencoder = instantiate(cfg.autoencoder)
    loss = instantiate(cfg.loss)
    # partial first: the stored run config holds `_target_`s that Hydra must not build
    module = instantiate(cfg.module, _partial_=True)(autoencoder=autoencoder, loss=loss, run_config=config)
    return module, data


def build_ldm_stage(cfg: DictConfig, config: dict):
    """Frozen autoencoder (a stage-1 run of ours or a pretrained one), the latent cache (built here when missing),
    U-Net (optionally from pretrained weights), condition encoder."""
    ae_source, ae_key = pretrained_source(cfg, *AUTOENCODER_KEYS)
    unet_source, unet_key = pretrained_source(cfg, *UNET_KEYS)
    if ae_source is None:
        raise ValueError("stage=ldm needs the autoencoder: autoencoder.pretrained=<stage-1 checkpoint or pretrained "
                         "autoencoder>")
    ae_ckpt = read_any(ae_source, autoencoder_preset=cfg.autoencoder_preset)
    if ae_ckpt["ldm"]["stage"] != "autoencoder":
        raise ValueError(f"{ae_key}={ae_source} is a {ae_ckpt['ldm']['stage']!r} checkpoint; "
                         "stage 2 needs a stage-1 (autoencoder) checkpoint or a pretrained autoencoder")
    autoencoder, stats = build_autoencoder(ae_ckpt)
    identity = autoencoder_identity(autoencoder)
    text_encoder = instantiate(cfg.text_encoder)
    cache_dir = Path(cfg.cache_dir or default_cache_dir(cfg, identity))
    if not (cache_dir / "manifest.json").is_file():
        log.info("no latent cache in %s: building it now (python -m ldm.cache does this on its own)", cache_dir)
        data = instantiate(cfg.data)
        ae_ckpt = read_stage1_checkpoint(ae_ckpt)  # checks that a checkpoint of ours holds its statistics
        device = resolve_device("cpu" if str(cfg.trainer.accelerator) == "cpu" else "auto")
        ae_ckpt = with_latent_stats(ae_ckpt, data, int(cfg.latent_stats_images), device, int(cfg.seed),
                                    cfg.autoencoder_latent_scale)
        build_cache(ae_ckpt, data, cache_dir, ckpt_path=ae_source, **cfg.cache)
    manifest = read_manifest(cache_dir)
    if stats is None and manifest.get("autoencoder", {}).get("identity") == identity:
        stats = manifest["latent_stats"]  # an imported autoencoder's statistics: measured once, kept in the cache
    if (problem := channel_spread_problem(stats or {}, str(cfg.latent_norm))) is not None:
        log.warning(problem)
    data = instantiate(cfg.latent_data, path=str(cache_dir))
    latent_shape = tuple(manifest["latent_shape"])
    f = autoencoder.downsample_factor
    if int(cfg.resolution) % f:
        raise ValueError(f"resolution={cfg.resolution} is not divisible by the autoencoder's downsampling factor {f}; "
                         f"use a multiple of {f} (e.g. {int(cfg.resolution) // f * f})")
    side = int(cfg.resolution) // f  # what this run's images encode to
    check_cache_compatible(manifest, identity, latent_shape=(autoencoder.latent_channels, side, side), stats=stats,
                           text_encoder=text_encoder)
    spec = architecture(OmegaConf.to_container(cfg.unet, resolve=True))
    unet = instantiate(spec)
    if unet_source is not None:  # fine-tuning: the weights must fit the configured architecture
        strict_load(unet, load_unet(unet_source, preset=spec).state_dict(), f"{unet_key}={unet_source}")
        log.info("U-Net initialised from %s", unet_source)
    if unet.in_channels != latent_shape[0]:
        raise ValueError(f"unet.in_channels={unet.in_channels} but the autoencoder's latents have "
                         f"{latent_shape[0]} channels; set unet.in_channels={latent_shape[0]} unet.out_channels="
                         f"{latent_shape[0]}")
    meta = {"autoencoder": {"ckpt_path": ae_source, "identity": identity,
                            "config": ae_ckpt["ldm"]["config"]["autoencoder"]},
            "cache": {"path": str(cache_dir), "created": manifest.get("created")}}
    module = instantiate(cfg.module, _partial_=True)(
        unet=unet, text_encoder=text_encoder, autoencoder=autoencoder, loss=instantiate(cfg.loss),
        latent_stats=stats, latent_shape=latent_shape, run_config=config, meta=meta,
    )
    return module, data


def default_cache_dir(cfg: DictConfig, identity: str) -> Path:
    """``<paths.latent_cache_root>/<dataset>-<res>px-<autoencoder sha[:12]>-<data config sha[:8]>``: a new
    autoencoder, resolution or data setting gets its own cache, and the same ones reuse it."""
    dataset = OmegaConf.to_container(cfg.data, resolve=True).get("dataset", {})  # what decides the images
    name = str(dataset.get("_target_", "data")).rsplit(".", 1)[-1].lower().removesuffix("dataset")
    data_sha = hashlib.sha256(json.dumps(dataset, sort_keys=True).encode()).hexdigest()[:8]
    return Path(cfg.paths.latent_cache_root) / f"{name or 'data'}-{cfg.resolution}px-{identity[:12]}-{data_sha}"


def write_latent_stats(cfg: DictConfig, trainer: pl.Trainer, data, run_dir: Path) -> None:
    """Store latent statistics, computed with each checkpoint's own weights, in last.ckpt and the best one."""
    ckpt_cb = trainer.checkpoint_callback
    paths = {str(run_dir / "checkpoints" / "last.ckpt")}
    if ckpt_cb is not None and ckpt_cb.best_model_path:
        paths.add(ckpt_cb.best_model_path)
    device = trainer.strategy.root_device
    for path in sorted(paths):
        images = (batch["image"] for batch in data.train_dataloader())
        stats = add_latent_stats(path, images, int(cfg.latent_stats_images), device=device, seed=cfg.seed)
        log.info("latent stats in %s: scale=%.5f shift=%.4f (%d images)", Path(path).name, stats["scale"],
                 stats["shift"], stats["n_images"])


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # Returned for Hydra sweepers (hparams_search): the checkpoint metric of the run.
    return metrics.get(cfg.monitor)


if __name__ == "__main__":
    main()
