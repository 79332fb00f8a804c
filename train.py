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
import logging
import signal
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.cli import check_arguments, quiet_lightning, user_errors
from ldm.config_checks import check_config, check_val_interval
from ldm.lit.callbacks import AtomicCheckpointIO, MonitorHistory, StepProgressBar
from ldm.lit.guard import NonFiniteTrainingError
from ldm.lit.resilience import (
    TrainingInterrupted,
    TrainingState,
    hand_on_to_submitit,
    remove_stale_temporaries,
    requeue_slurm_job,
)
from ldm.runs import (
    RunFolderTaken,
    check_run_folder,
    last_good_checkpoint,
    resume_path,
    resumed_history,
)
from ldm.runtime import auto_precision
from ldm.stages import build_autoencoder_stage, build_ldm_stage, write_latent_stats
from ldm.sweeps import continue_with, in_sweep, record_job, summarise

log = logging.getLogger("ldm.train")


def train(cfg: DictConfig, outcome: dict | None = None) -> dict[str, float]:
    """Fit the configured stage; returns the final logged metrics. ``outcome`` (optional) receives the trainer and
    the monitored metric's history as soon as they exist, for the job's ``result.json`` even when fit fails."""
    outcome = {} if outcome is None else outcome
    quiet_lightning()
    check_config(cfg)
    if cfg.trainer.precision == "auto":
        with open_dict(cfg):
            cfg.trainer.precision = auto_precision(str(cfg.trainer.accelerator))
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)  # stored in every checkpoint
    ckpt_path, own = resume_path(cfg, run_dir, sweep_job=in_sweep())
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
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if "train/skipped_steps" in metrics:  # with the guard deciding on the GPU, the last step is counted after its log
        metrics["train/skipped_steps"] = float(module.guard.total)
    return metrics


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


if __name__ == "__main__":
    check_arguments("train", "python train.py")
    main()
