"""What keeps a days-long run from losing work or writing garbage besides the bad-step guard (``ldm.lit.guard``):
signals, exact data position, resumed optimisation settings, and checkpoints that never hold non-finite numbers.

- ``TrainingState`` (callback): advances the train loader's position after every batch, and turns SIGTERM,
  SIGINT and SIGUSR1 (and a submitit job's SIGUSR2) into "save ``last.ckpt`` at this step, then stop"
  (``TrainingInterrupted``; train.py exits with 128 + signal; for SIGUSR1 on SLURM it requeues the job, for
  submitit's signal submitit does, ``hand_on_to_submitit``).
- ``restart_optimisation``: on resume, the optimizers take the hyperparameters of the *new* config and the LR
  schedules are rebuilt and fast-forwarded to the resumed step (so a larger ``max_steps`` stretches a cosine).
- ``FiniteModelCheckpoint``: a NaN/inf monitor value is never "best"; ``best-*`` files that the resumed state
  does not know (written after the checkpoint a killed run resumes from) are removed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor

from ldm.data.resumable import ResumableDataLoader, batch_len
from ldm.lit.optim import IMPLEMENTATION_KEYS

log = logging.getLogger("ldm.train")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def submitit_signal() -> int | None:
    """The signal a submitit job gets before its time limit or on pre-emption (SIGUSR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` names another); None outside submitit jobs."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def hand_on_to_submitit(signum: int) -> None:
    """After the save, give submitit's signal to the handler submitit installed before ldm's (restored when
    training ends): it re-submits the same job (a requeue on SLURM, a restart under the local executor) and exits.
    The new attempt finds ``last.ckpt`` in its folder and continues (a sweep job resumes its own folder)."""
    if signum != submitit_signal():
        return
    handler = signal.getsignal(signum)
    if callable(handler):
        log.warning("handing %s on to submitit: the job is requeued and continues from last.ckpt",
                    signal.Signals(signum).name)
        handler(signum, None)


class TrainingInterrupted(Exception):
    """A handled signal arrived; ``last.ckpt`` holds the state at ``step``."""

    def __init__(self, signum: int, step: int, path: str | None) -> None:
        self.signum, self.step, self.path = signum, step, path
        done = f"saved {path} at step {step}" if path else f"stopped before training (step {step}): nothing to save"
        super().__init__(f"{signal.Signals(signum).name} received: {done}")


# ------------------------------------------------------------------------------------------------ bad steps

def check_finite_state(state: dict[str, Any], what: str) -> None:
    """Raise if a checkpoint's tensors hold NaN/inf: such a file is never written."""
    bad = [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise NonFiniteCheckpointError(f"refusing to write {what}: {len(bad)} of {len(state)} tensors hold NaN/inf "
                                       f"(e.g. {bad[:3]}); the last checkpoint on disk is kept")


class NonFiniteCheckpointError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ resumed optimisation

def restart_optimisation(module: pl.LightningModule, factories: Iterable[Callable[..., torch.optim.Optimizer]],
                         lr: float, scheduler_factory: Callable[..., Any] | None) -> None:
    """After a resume: give the restored optimizers the hyperparameters of the current config (the restored
    state carries the old ones) and rebuild the LR schedules from it, fast-forwarded to ``global_step``.

    Fast-forwarding steps a fresh scheduler once per optimizer step, as the run itself does, so an unchanged
    config gives bit-for-bit the learning rates of an uninterrupted run, and a changed one (``max_steps`` of a
    cosine, the base lr, warm-up length) the schedule the new config describes at this step.
    """
    trainer = module.trainer
    for opt, factory in zip(trainer.optimizers, factories, strict=True):
        fresh = factory([torch.zeros(1, requires_grad=True)], lr=lr).defaults  # the new hyperparameters
        for group in opt.param_groups:
            # hyperparameters only: the restored optimizer keeps its implementation (fused on CUDA, ldm.lit.optim)
            group.update({k: v for k, v in fresh.items() if k != "params" and k not in IMPLEMENTATION_KEYS})
            group.pop("initial_lr", None)
    if scheduler_factory is None:
        return
    steps = trainer.global_step
    for config in trainer.lr_scheduler_configs:
        scheduler = scheduler_factory(config.scheduler.optimizer)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(steps):
                scheduler.step()
        config.scheduler = scheduler


# ------------------------------------------------------------------------------------------- signals & data

class TrainingState(pl.Callback):
    """Data position and signals (module docstring). One per run; train.py adds it."""

    def __init__(self, checkpoint_dir: str | os.PathLike, signals: Iterable[int] | None = None) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        extra = submitit_signal()  # a submitit job's pre-emption signal: save first, then submitit requeues
        self.signals = tuple(signals) if signals is not None else HANDLED_SIGNALS + ((extra,) if extra else ())
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    # Signals: ``install`` before ``trainer.fit`` (so none is lost while models load and the sanity check runs),
    # and again once training starts, over the handlers Lightning registers in between.
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl+C: stop now, no save
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.received is not None and self.received == submitit_signal():
            return  # submitit's signal came first: it decides (save, then requeue), a later SIGTERM does not
        self.received = signum
        log.warning("%s received: saving at the end of this step, then stopping", signal.Signals(signum).name)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            previous = signal.signal(signum, self._handler)
            self._previous.setdefault(signum, previous)  # the handlers from before ldm, restored by uninstall

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.received:  # arrived while loading or in the sanity check: nothing trained yet, nothing to save
            raise TrainingInterrupted(self.received, trainer.global_step, None)
        self.install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.uninstall()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for loader in _resumable(trainer):
            loader.advance(batch_len(batch))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Stop before a batch, not after one: the previous batch is complete with its validation and checkpoint
        # (a stop after a batch would skip the validation due at that step, which the resumed run never makes up).
        accumulate = int(getattr(pl_module, "accumulate", trainer.accumulate_grad_batches))
        if batch_idx % accumulate:
            return  # never stop between the micro-batches of one optimizer step
        signum = self._agreed_signal(trainer, pl_module)
        if signum:
            path = self.checkpoint_dir / "last.ckpt"
            # Lightning counts this batch as fetched ("ready"): saved as of the end of the previous batch, the state
            # a resumed run continues from (its batch counter, which places validations, then matches global_step)
            # (and not known to be the epoch's last: a resume must run it as the last batch, not start a new epoch)
            progress = trainer.fit_loop.epoch_loop.batch_progress
            progress.total.ready, progress.current.ready = progress.total.completed, progress.current.completed
            progress.is_last_batch = False
            trainer.save_checkpoint(path, weights_only=False)  # the full state: resumable
            raise TrainingInterrupted(signum, trainer.global_step, str(path))

    def _agreed_signal(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """The signal any rank received (all ranks must stop at the same step)."""
        mine = self.received or 0
        if trainer.world_size == 1:
            return mine
        flag = torch.tensor([mine], device=pl_module.device)
        return int(trainer.strategy.reduce(flag, reduce_op="max").item())


def _resumable(trainer: pl.Trainer) -> list[ResumableDataLoader]:
    loaders = trainer.train_dataloader
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return [dl for dl in loaders if isinstance(dl, ResumableDataLoader)]


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array tasks included), as Lightning's SLURM auto-requeue does."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False).returncode
    except FileNotFoundError:
        log.error("scontrol not found: cannot requeue SLURM job %s; resubmit with resume=auto", job)
        return False
    log.info("requeue of SLURM job %s: %s", job, "done" if result == 0 else f"failed (exit {result})")
    return result == 0


# ------------------------------------------------------------------------------------------------ checkpoints

class FiniteModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never ranks a NaN/inf monitor value as best (Lightning ranks NaN as +inf, which
    still becomes "best" when nothing was saved before), and that removes, on resume, ``best-*`` files the
    restored state does not know: a killed run may have written them after the checkpoint it resumes from."""

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        current = monitor_candidates.get(self.monitor) if self.monitor else None
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current))):
            log.warning("step %d: %s = %s is not finite: not a candidate for the best checkpoint",
                        trainer.global_step, self.monitor, float(current))
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    # Lightning writes `last.ckpt` only when a top-k file was written at the same step, so a run whose validation
    # stopped improving would resume from an old state; `last.ckpt` follows every save point here.
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.dirpath is None:
            super().load_state_dict(state_dict)
            return
        # The stored paths are absolute; a run folder that was moved or copied must keep using its own files, so
        # every stored file is taken by name from this run's checkpoint folder.
        here = Path(self.dirpath)

        def local(path: Any) -> Any:
            return str(here / Path(path).name) if path else path

        state_dict = dict(state_dict, dirpath=self.dirpath, best_model_path=local(state_dict.get("best_model_path")),
                          kth_best_model_path=local(state_dict.get("kth_best_model_path")),
                          last_model_path=local(state_dict.get("last_model_path")),
                          best_k_models={local(k): v for k, v in (state_dict.get("best_k_models") or {}).items()})
        super().load_state_dict(state_dict)
        prefix = str(self.filename or "").split("{", 1)[0]
        if not prefix or not here.is_dir():
            return
        known = {Path(p).name for p in self.best_k_models} | {Path(self.best_model_path).name}
        for path in here.glob(f"{prefix}*{self.FILE_EXTENSION}"):
            if path.name not in known:
                log.info("removing %s: written after the checkpoint this run resumes from", path.name)
                path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves that were killed before their rename (``.<name>.*.tmp``)."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished checkpoint file(s) of a killed save in %s", len(stale), folder)
    return stale
