"""Train either stage of ldm from a Hydra config.

    python train.py                                   # stage 1 quickstart: tiny KL-VAE on `shapes`, CPU or GPU
    python train.py experiment=paper/kl_f8 trainer=ddp  # the paper's KL-f8 autoencoder on every GPU
    python train.py run_name=exp1 resume=auto         # continue outputs/autoencoder/exp1 where it stopped

Reads top to bottom: check the config, build data / model / loss / trainer, fit, then store the latent
statistics in the checkpoints for stage 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.checkpoint import add_latent_stats
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
    if cfg.stage_name != "autoencoder":
        problems.append(f"stage {cfg.stage_name!r} is not available yet; use stage=autoencoder")
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


def train(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg)
    if cfg.trainer.precision == "auto":
        with open_dict(cfg):
            cfg.trainer.precision = auto_precision(str(cfg.trainer.accelerator))
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)  # stored in every checkpoint

    data = instantiate(cfg.data)
    autoencoder = instantiate(cfg.autoencoder)
    loss = instantiate(cfg.loss)
    # partial first: the stored run config holds `_target_`s that Hydra must not build
    module = instantiate(cfg.module, _partial_=True)(autoencoder=autoencoder, loss=loss, run_config=config)

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
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        if trainer.is_global_zero:
            write_latent_stats(cfg, trainer, data, run_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


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
