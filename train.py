"""Train either stage of ldm from a Hydra config.

    python train.py                                   # stage 1 quickstart: tiny KL-VAE on `shapes`, CPU or GPU
    python train.py experiment=paper/kl_f8 trainer=ddp  # the paper's KL-f8 autoencoder on every GPU
    python train.py run_name=exp1 resume=auto         # continue outputs/autoencoder/exp1 where it stopped
    python train.py stage=ldm autoencoder.pretrained=outputs/autoencoder/exp1/checkpoints/last.ckpt   # stage 2
    python train.py hparams_search=optuna_autoencoder  # an Optuna search: summary.md / .csv in its sweep folder

Reads top to bottom: check the config, build data / model / loss for the stage, fit, then (stage 1) store the
latent statistics in the checkpoints for stage 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import signal
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import IterableDataset

from ldm.cache import build_cache, read_stage1_checkpoint, with_latent_stats
from ldm.checkpoint import add_latent_stats, architecture, build_autoencoder, load_torch_file, strict_load
from ldm.cli import print_help_and_exit, quiet_lightning, user_errors
from ldm.data.latent_format import autoencoder_identity, check_cache_compatible, read_manifest
from ldm.export import load_unet, pretrained_source, read_any
from ldm.lit.callbacks import AtomicCheckpointIO, MonitorHistory, StepProgressBar
from ldm.lit.resilience import (
    NonFiniteTrainingError,
    TrainingInterrupted,
    TrainingState,
    hand_on_to_submitit,
    remove_stale_temporaries,
    requeue_slurm_job,
)
from ldm.losses.lpips import lpips_min_input_size
from ldm.models.discriminator import patchgan_min_input_size
from ldm.models.latent_stats import channel_spread_problem
from ldm.runs import (
    RunFolderTaken,
    check_run_folder,
    config_changes,
    describe,
    history_with,
    last_good_checkpoint,
    refuse_changes,
)
from ldm.runtime import auto_precision, resolve_device
from ldm.sweeps import OBJECTIVE_MODES, objective_value, summarise, write_job_result

log = logging.getLogger("ldm.train")
HIGHER_IS_BETTER = ("val/psnr", "val/ssim")  # logged metrics a `monitor` (lowest is best) must not be


def latents_on_gpu(cfg: DictConfig) -> bool:
    """``latent_data.on_gpu``; ``auto``: on when the run trains on CUDA (in-memory latents gathered on the GPU)."""
    value = cfg.latent_data.get("on_gpu", False)
    if value == "auto":
        return str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return bool(value)


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


def in_sweep() -> bool:
    """A job of a multirun (``-m``, ``hparams_search=``, a launcher such as SLURM)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def resume_path(cfg: DictConfig, run_dir: Path) -> tuple[str | None, bool]:
    """(the checkpoint to continue from, whether it is this run folder's own): ``ckpt_path``, or with
    ``resume=auto`` the folder's ``last.ckpt`` (its newest checkpoint when a kill came between two saves). A sweep
    job resumes its own folder by default, before ``ckpt_path``: a job folder holding a checkpoint is a requeued
    attempt of the job, and ``ckpt_path`` was where its first attempt started."""
    sweep_job = cfg.resume is None and in_sweep()
    if cfg.ckpt_path is not None and not sweep_job:
        return str(cfg.ckpt_path), Path(cfg.ckpt_path).resolve().parent == (run_dir / "checkpoints").resolve()
    if cfg.resume == "auto" or sweep_job:
        own = run_dir / "checkpoints" / "last.ckpt"
        own = own if own.is_file() else last_good_checkpoint(run_dir)
        if own is not None:
            log.info("resume=auto: continuing from %s", own)
            return str(own), True
        if cfg.ckpt_path is None:
            log.info("resume=auto: no checkpoint in %s yet, starting a new run", run_dir / "checkpoints")
    return (str(cfg.ckpt_path), False) if cfg.ckpt_path is not None else (None, False)


def one_spelling(cfg: DictConfig) -> None:
    """Keep each stage-2 pretrained source under its main key only (the older spelling set to null), so the stored
    run config reads the same whichever spelling the command used, and a later override of the main key alone
    does not meet a stale copy."""
    with open_dict(cfg):
        for key, older in (AUTOENCODER_KEYS, UNET_KEYS):
            source, _ = pretrained_source(cfg, key, older)
            OmegaConf.update(cfg, key, source)
            OmegaConf.update(cfg, older, None)


def train(cfg: DictConfig, outcome: dict | None = None) -> dict[str, float]:
    """Fit the configured stage; returns the final logged metrics. ``outcome`` (optional) receives the trainer and
    the monitored metric's history as soon as they exist, for the job's ``result.json`` even when fit fails."""
    outcome = {} if outcome is None else outcome
    quiet_lightning()
    check_config(cfg)
    if cfg.stage_name == "ldm":
        one_spelling(cfg)
    if cfg.trainer.precision == "auto":
        with open_dict(cfg):
            cfg.trainer.precision = auto_precision(str(cfg.trainer.accelerator))
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)  # stored in every checkpoint
    ckpt_path, own = resume_path(cfg, run_dir)
    check_run_folder(run_dir, ckpt_path)  # a run folder belongs to one run
    remove_stale_temporaries(run_dir / "checkpoints")
    # refuses architecture / data changes before any work (in a sweep's implicit resume: any change)
    history = resumed_history(ckpt_path, config, same_run=own and cfg.resume is None and in_sweep())

    build = build_ldm_stage if cfg.stage_name == "ldm" else build_autoencoder_stage
    module, data = build(cfg, config)
    module.history = history
    train_loader = data.train_dataloader()
    check_val_interval(cfg, train_loader)

    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]  # null: switched off
    state = TrainingState(run_dir / "checkpoints")  # data position, signals
    # the sweeper's objective, kept across resumes of this run (not taken from a run it started from)
    outcome["monitor"] = MonitorHistory(cfg.monitor, inherit=own or ckpt_path is None)
    callbacks += [state, outcome["monitor"]] + ([StepProgressBar()] if cfg.trainer.enable_progress_bar else [])
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    # on SLURM, SIGUSR1 is ours (save, then requeue), not Lightning's (which saves elsewhere, mid-step)
    plugins = [AtomicCheckpointIO()] + ([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    outcome["trainer"] = trainer
    log.info("run directory: %s", run_dir)
    log.info("data: %s", data.describe())
    state.install()
    try:
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=data.val_dataloader(),
                    ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning's own SIGTERM exit (before training started): ours, with its exit code
        raise TrainingInterrupted(state.received or signal.SIGTERM, trainer.global_step, None) from None
    finally:
        state.uninstall()

    if not cfg.trainer.fast_dev_run:
        # Lightning saves `last.ckpt` after validations; a run that stops on max_steps between two
        # validations would lose its final steps. Save the final state explicitly (all ranks must call this).
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)  # the full state: resumable
        if trainer.is_global_zero and cfg.stage_name == "autoencoder":
            write_latent_stats(cfg, trainer, data, run_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def resumed_history(ckpt_path: str | None, config: dict, same_run: bool = False) -> list[dict]:
    """The configs this run was trained under, ending with ``config``. On resume, a changed architecture or data
    is refused (naming the keys); changed optimisation settings are applied, logged and recorded. ``same_run``
    (a sweep job finding a checkpoint in its folder): any change is refused, the folder holds another run."""
    if ckpt_path is None:
        return [{"step": 0, "config": config, "time": None}]
    stored = read_resume_checkpoint(Path(ckpt_path))
    meta = stored.get("ldm") or {}
    if "config" not in meta:
        raise ValueError(f"{ckpt_path} is not a checkpoint of an ldm training run (no stored config): resume only "
                         "continues runs of train.py; start from other weights with autoencoder.pretrained / "
                         "unet.pretrained")
    refused, applied = config_changes(meta["config"], config)
    if same_run and (refused or applied):
        raise RunFolderTaken(f"this sweep job's folder holds a checkpoint of another run ({ckpt_path}; it differs in "
                         f"{', '.join(sorted({**refused, **applied}))}). A sweep job only resumes itself: start the "
                         "sweep in a new folder (hydra.sweep.dir=...), or give resume=auto to continue it anyway")
    refuse_changes(refused, ckpt_path)
    if applied:
        log.warning("resuming with changed settings (applied from step %d, recorded in the checkpoint's "
                    "history):\n%s", stored.get("global_step", 0), describe(applied))
    return history_with(meta, config, int(stored.get("global_step", 0)))


def read_resume_checkpoint(path: Path) -> dict:
    """The checkpoint to resume from, or a clear error when it is damaged (a copy or a save cut short)."""
    try:
        try:
            return load_torch_file(path, mmap=True)
        except RuntimeError:  # not the zip format mmap needs: read it whole (and fail below if it is broken)
            return load_torch_file(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        others = [p.name for p in sorted(path.parent.glob("*.ckpt")) if p != path]
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}): the file is "
                         "damaged, e.g. a copy cut short. Resume from another checkpoint of the run with ckpt_path="
                         f"{path.parent}/<name>{' (there: ' + ', '.join(others) + ')' if others else ''}") from err


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
    spec = architecture(OmegaConf.to_container(cfg.unet, resolve=True))
    # read (and checked) before any work; copied into the configured U-Net below
    with torch.random.fork_rng():  # its throwaway initialisation must not shift the seeded ones below
        pretrained_unet = load_unet(unet_source, preset=spec) if unet_source is not None else None
    identity = autoencoder_identity(autoencoder)
    text_encoder = instantiate(cfg.text_encoder)
    cache_dir = Path(cfg.cache_dir or default_cache_dir(cfg, identity))
    if not (cache_dir / "manifest.json").is_file():
        check_labels(cfg, text_encoder, instantiate(cfg.data).dataset("train"), "the training images")
        log.info("no latent cache in %s: building it now (python -m ldm.cache does this on its own)", cache_dir)
        # its random draws must not shift the model's initialisation: same seed, same run, cache built or not
        with torch.random.fork_rng():
            build_default_cache(cfg, ae_ckpt, ae_source, cache_dir)
    manifest = read_manifest(cache_dir)
    if stats is None and manifest.get("autoencoder", {}).get("identity") == identity:
        stats = manifest["latent_stats"]  # an imported autoencoder's statistics: measured once, kept in the cache
    if (problem := channel_spread_problem(stats or {}, str(cfg.latent_norm))) is not None:
        log.warning(problem)
    data = instantiate(cfg.latent_data, path=str(cache_dir), on_gpu=latents_on_gpu(cfg))
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
        strict_load(unet, pretrained_unet.state_dict(), f"{unet_key}={unet_source}")
        del pretrained_unet
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
                         f"{OmegaConf.select(cfg, 'data.dataset._target_')}). Use a labelled dataset (data=fashion_mnist)"
                         ", or a text encoder that reads captions (text_encoder=transformer_small, minilm, ...) or "
                         "none (unconditional)")


def build_default_cache(cfg: DictConfig, ae_ckpt: dict, ae_source: str, cache_dir: Path) -> None:
    data = instantiate(cfg.data)
    ae_ckpt = read_stage1_checkpoint(ae_ckpt)  # checks that a checkpoint of ours holds its statistics
    device = resolve_device("cpu" if str(cfg.trainer.accelerator) == "cpu" else "auto")
    ae_ckpt = with_latent_stats(ae_ckpt, data, int(cfg.latent_stats_images), device, int(cfg.seed),
                                cfg.autoencoder_latent_scale)
    build_cache(ae_ckpt, data, cache_dir, ckpt_path=ae_source, **cfg.cache)


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
        best = Path(ckpt_cb.best_model_path)
        if best.is_file() and best.parent.resolve() == (run_dir / "checkpoints").resolve():  # this run's files only
            paths.add(str(best))
    device = trainer.strategy.root_device
    for path in sorted(paths):
        images = (batch["image"] for batch in data.train_dataloader())
        stats = add_latent_stats(path, images, int(cfg.latent_stats_images), device=device, seed=cfg.seed)
        log.info("latent stats in %s: scale=%.5f shift=%.4f (%d images)", Path(path).name, stats["scale"],
                 stats["shift"], stats["n_images"])


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@user_errors("python train.py")
def main(cfg: DictConfig) -> float | None:
    """Train; return the objective for Hydra sweepers (None when the run failed: a failed trial, the sweep goes
    on). Every run leaves ``result.json`` in its folder, the row of a sweep's summary table."""
    run_dir, outcome = Path(cfg.paths.output_dir), {}
    try:
        metrics = train(cfg, outcome)
    except TrainingInterrupted as stop:  # SIGTERM / SIGINT / SIGUSR1 (SIGUSR2 under submitit): saved at this step
        record_job(cfg, run_dir, outcome, "interrupted", error=str(stop))
        if in_sweep():  # the job leaves by exit, without Hydra's on_job_end: refresh the sweep's table here
            with contextlib.suppress(Exception):
                summarise(HydraConfig.get().sweep.dir)
        hand_on_to_submitit(stop.signum)  # a submitit job: its handler requeues it (and exits)
        requeued = stop.signum == signal.SIGUSR1 and requeue_slurm_job()
        log.warning("%s; %s", stop, "the SLURM job is requeued and continues with resume=auto" if requeued else
                    f"continue with the same command and {continue_with(cfg)}")
        sys.exit(128 + stop.signum)
    except RunFolderTaken as err:  # nothing of this attempt may be written into another run's folder
        if not in_sweep():
            raise
        log.error("%s\nthis sweep job failed; the sweep goes on", err)
        return None
    except NonFiniteTrainingError as err:
        good = last_good_checkpoint(run_dir)
        message = (f"training stopped: {err}. The last good checkpoint is "
                   f"{good if good is not None else 'none (no checkpoint was written before)'}; resume it with "
                   f"{continue_with(cfg)} and e.g. a lower learning rate, or raise module.max_consecutive_skips")
        record_job(cfg, run_dir, outcome, "non-finite", error=message)
        if not in_sweep():
            sys.exit(message)
        log.error("%s\nthis sweep job failed; the sweep goes on", message)
        return None
    except Exception as err:
        record_job(cfg, run_dir, outcome, "failed", error=f"{type(err).__name__}: {err}")
        if not in_sweep():
            raise
        log.exception("this sweep job failed; the sweep goes on")
        return None
    return record_job(cfg, run_dir, outcome, "completed", metrics=metrics)


def continue_with(cfg: DictConfig) -> str:
    """The overrides that continue this run: its run_name, or in a sweep the sweep's folder."""
    if in_sweep():
        return f"hydra.sweep.dir={HydraConfig.get().sweep.dir} (a sweep job resumes its own folder)"
    return f"run_name={cfg.run_name} resume=auto"


def record_job(cfg: DictConfig, run_dir: Path, outcome: dict, status: str, metrics: dict | None = None,
               error: str | None = None) -> float | None:
    """Write the run's ``result.json`` (rank 0); returns the objective
    (``objective=best|last`` of ``monitor``)."""
    monitor, trainer = outcome.get("monitor"), outcome.get("trainer")
    values = monitor.values if monitor is not None else []
    objective = objective_value(values, str(cfg.objective)) if status == "completed" else None
    if status == "completed" and objective is None:
        log.warning("no finite validation value of monitor=%s: the sweeper gets no objective", cfg.monitor)
    if trainer is not None and not trainer.is_global_zero:
        return objective
    best = getattr(trainer.checkpoint_callback if trainer is not None else None, "best_model_path", "") or ""
    last = run_dir / "checkpoints" / "last.ckpt"
    final = {k: float(v) for k, v in (metrics or getattr(trainer, "callback_metrics", {})).items()}
    write_job_result(
        run_dir, status=status, objective=objective, objective_mode=str(cfg.objective), monitor=cfg.monitor,
        monitor_values=values, step=trainer.global_step if trainer is not None else None,
        train_time_s=monitor.seconds if monitor is not None else None,
        attempts=monitor.attempts if monitor is not None else 0, error=error,
        # the latest validation's metrics survive a resume that has nothing left to train
        metrics={**(monitor.last_metrics if monitor is not None else {}), **final},
        best_checkpoint=best if best and Path(best).is_file() else "",  # not a parent run's best, named here
        last_checkpoint=str(last) if last.is_file() else "")
    return objective


if __name__ == "__main__":
    print_help_and_exit("train", "python train.py")
    main()
