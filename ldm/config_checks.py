"""Configuration checks of train.py and evaluate.py: impossible settings are refused before any work starts, each problem naming
the key and the fix (all problems of a config in one error).

- ``check_evaluation``: evaluate.py's settings, its task (from the checkpoint's stage) and the data it measures on.
- ``check_config``: both stages (batch size, devices, resume keys, the sweep objective and monitor) and each
  stage's own (stage 2: the pretrained sources exist; stage 1: resolution against the autoencoder, PatchGAN and
  LPIPS); ``check_val_interval`` and ``check_labels`` need the data, so they run once it is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import IterableDataset

from ldm.checkpoint import source_missing
from ldm.data.common import check_resolution
from ldm.evaluation.imagesets import probe_image_set
from ldm.export import pretrained_source, read_any
from ldm.losses.lpips import lpips_min_input_size
from ldm.metrics.results import PAPER_TABLES
from ldm.models.discriminator import patchgan_min_input_size
from ldm.pipeline import resolve_sampling
from ldm.runtime import compile_options
from ldm.sweeps import OBJECTIVE_MODES, in_sweep

HIGHER_IS_BETTER = ("val/psnr", "val/ssim")  # logged metrics a `monitor` (lowest is best) must not be
EVAL_TASKS = {"autoencoder": "recon", "ldm": "generation"}  # checkpoint stage -> evaluate.py's task


def check_config(cfg: DictConfig) -> None:
    """Reject impossible settings before any work starts, naming the key and the fix."""
    problems = []
    if cfg.stage_name == "ldm":
        problems += _ldm_problems(cfg)
    else:
        problems += _autoencoder_problems(cfg)
    if int(cfg.batch_size) < 1:
        problems.append(f"batch_size={cfg.batch_size} must be >= 1")
    try:
        compile_options(OmegaConf.select(cfg, "module.compile"))
    except ValueError as err:
        problems.append(str(err))
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        problems.append("trainer asks for GPUs but CUDA is not available; use trainer=cpu (or trainer=default)")
    if cfg.resume not in (None, "auto"):
        problems.append(f"resume={cfg.resume!r}: use resume=auto, or ckpt_path=<file> for a given checkpoint")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        problems.append(f"ckpt_path={cfg.ckpt_path} does not exist")
    if cfg.get("objective") not in OBJECTIVE_MODES:
        problems.append(f"objective={cfg.get('objective')!r}: use one of {', '.join(OBJECTIVE_MODES)}")
    if cfg.monitor in HIGHER_IS_BETTER:
        problems.append(f"monitor={cfg.monitor} is higher-is-better, but checkpoints and sweep objectives keep the "
                        "lowest value: monitor a loss (val/lpips, val/rec_loss, val/loss, val/eps_mse)")
    if in_sweep() and "max" in str(OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="")).lower():
        problems.append("hydra.sweeper.direction=maximize: train.py's objective is a lower-is-better `monitor` "
                        "value; use direction=minimize")
    if cfg.trainer.get("gradient_clip_val") is not None:
        problems.append("trainer.gradient_clip_val: clipping is done by the module, with the non-finite check; "
                        f"use module.gradient_clip_val={cfg.trainer.gradient_clip_val}")
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _ldm_problems(cfg: DictConfig) -> list[str]:
    problems = []
    for key in ("autoencoder.pretrained", "unet.pretrained"):
        source = pretrained_source(cfg, key)
        if source is None and key == "autoencoder.pretrained":
            problems.append("stage=ldm needs the stage-1 checkpoint: autoencoder.pretrained=outputs/autoencoder/<run>/"
                            "checkpoints/last.ckpt (train one with `python train.py`), or a pretrained autoencoder")
        elif source is not None and source_missing(source):
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
    vq_model = str(cfg.autoencoder.get("_target_", "")).endswith(".VQModel")
    vq_loss = str(cfg.loss.get("_target_", "")).endswith(".VQAutoencoderLoss")
    if vq_model != vq_loss:
        problems.append(f"a {'VQ' if vq_model else 'KL'} autoencoder ({cfg.autoencoder._target_}) is trained with "
                        f"loss={'autoencoder_vq' if vq_model else 'autoencoder'}, not with the "
                        f"{'KL' if vq_model else 'VQ'} loss ({cfg.loss._target_}): pass "
                        f"loss={'autoencoder_vq' if vq_model else 'autoencoder'}")
    return problems



def check_val_interval(cfg: DictConfig, loader) -> None:
    """Lightning refuses a batch validation interval longer than an epoch only once training starts."""
    interval = cfg.trainer.get("val_check_interval")
    try:
        batches = len(loader)
    except TypeError:
        return
    if isinstance(interval, int) and interval > batches and cfg.trainer.get("check_val_every_n_epoch") is not None:
        raise ValueError(
            f"trainer.val_check_interval={interval} steps is longer than one epoch of the training data ({batches} "
            f"batches of {cfg.batch_size}). Lower trainer.val_check_interval (<= {batches}), or validate every "
            f"{interval} steps across epochs with trainer.check_val_every_n_epoch=null")


def check_classes(text_encoder, manifest: dict, cache_dir) -> None:
    """A class-conditional model needs an embedding for every label of its latent cache (its ``classes.json``)."""
    classes = manifest.get("classes")
    if getattr(text_encoder, "input_key", "caption") != "label" or not classes:
        return
    if classes["num_classes"] > text_encoder.num_classes:
        raise ValueError(f"text_encoder.num_classes={text_encoder.num_classes}, but the latent cache {cache_dir} has "
                         f"labels up to {classes['num_classes'] - 1} (its classes.json): set "
                         f"text_encoder.num_classes={classes['num_classes']}")


def check_labels(cfg: DictConfig, text_encoder, dataset, what: str) -> None:
    """A class-conditional model needs a class label in every sample; say so before any work."""
    if getattr(text_encoder, "input_key", "caption") != "label":
        return
    sample = next(iter(dataset)) if isinstance(dataset, IterableDataset) else dataset[0]
    label = sample.get("label")
    if label is None:
        label = json.loads(sample.get("attributes") or "{}").get("label")
    if label is None:
        raise ValueError(f"text_encoder=class conditions on class labels, but {what} carry none (data="
                         f"{OmegaConf.select(cfg, 'data.dataset._target_')}). Use labelled data (data=fashion_mnist; "
                         "data.dataset.labels=subfolder for a folder with one subfolder per class; "
                         "data.dataset.labels=shape data.dataset.max_shapes=1 for shapes)"
                         ", or a text encoder that reads captions (text_encoder=transformer_small, minilm, ...) or "
                         "none (unconditional)")


def check_eval_data(cfg: DictConfig, ckpt: dict) -> None:
    """evaluate.py measures on ``data`` (default ``shapes``): a checkpoint trained on other images is evaluated on
    them only when the command names its data (``data=...`` or ``data.*``), never by the default."""
    stored = ((ckpt["ldm"].get("config") or {}).get("data") or {}).get("dataset") or {}
    trained, reading = stored.get("_target_"), OmegaConf.select(cfg, "data.dataset._target_")
    if trained is None or trained == reading or not HydraConfig.initialized():
        return
    overrides = HydraConfig.get().overrides.task
    if any(o.lstrip("+~").split("=")[0].split(".")[0] == "data" for o in overrides):
        return
    where = f" (root {stored['root']})" if stored.get("root") else ""
    raise ValueError(f"ckpt={cfg.ckpt} was trained on {trained}{where}, but evaluate.py would measure it on {reading} "
                     f"(its default data): pass the data to evaluate on, e.g. data=folder data.dataset.root=<images> "
                     f"(data=shapes to measure it on shapes after all)")


def check_evaluation(cfg: DictConfig) -> tuple[str, dict[str, Any] | None]:
    """evaluate.py's task and the loaded checkpoint (None for task=fid); wrong settings and combinations stop before
    any checkpoint, image set or feature extractor is loaded."""
    if cfg.resolution is not None:
        check_resolution(cfg.resolution)
    resolve_sampling(cfg.steps, cfg.cfg_scale, cfg.sampler.steps, cfg.sampler.cfg_scale)
    if cfg.task not in ("auto", "recon", "generation", "fid"):
        raise ValueError(f"task={cfg.task!r}: use auto (from the checkpoint), recon, generation or fid")
    if cfg.compare is not None and cfg.compare not in PAPER_TABLES:
        raise ValueError(f"compare={cfg.compare!r}: use null or one of {sorted(PAPER_TABLES)}")
    if cfg.task == "fid":
        if cfg.real is None or cfg.fake is None:
            raise ValueError("task=fid compares two image sets: pass real=<folder|shards> fake=<folder|shards>")
        for name, path in (("real", cfg.real), ("fake", cfg.fake)):
            if not (name == "real" and str(path).endswith(".npz")):
                probe_image_set(str(path), name)  # a set without one readable image is named here
        return "fid", None
    if cfg.ckpt is None:
        raise ValueError("pass ckpt=<checkpoint written by train.py> (stage 1 or 2), or task=fid real=... fake=...")
    ckpt = read_any(cfg.ckpt, autoencoder_preset=cfg.autoencoder_preset)  # ours, an export, or a pretrained VAE
    check_eval_data(cfg, ckpt)
    stage = ckpt["ldm"]["stage"]
    if stage not in EVAL_TASKS:
        raise ValueError(f"ckpt={cfg.ckpt} holds a U-Net only: evaluate a stage-2 checkpoint (with its autoencoder) "
                         "or an autoencoder")
    if cfg.task not in ("auto", EVAL_TASKS[stage]):
        wanted = "a stage-1 (autoencoder)" if cfg.task == "recon" else "a stage-2 (ldm)"
        raise ValueError(f"task={cfg.task} needs {wanted} checkpoint, but ckpt={cfg.ckpt} is a {stage!r} "
                         f"checkpoint; use task=auto (here: task={EVAL_TASKS[stage]})")
    return EVAL_TASKS[stage], ckpt
