"""Lightning callbacks and plugins: image grids, atomic checkpoint writes, a DDP consistency check, the history
of the monitored metric, a progress bar in steps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torchvision.utils import make_grid, save_image

from ldm.checkpoint import atomic_torch_save, load_torch_file
from ldm.lit.resilience import check_finite_state


class AtomicCheckpointIO(TorchCheckpointIO):
    """How Lightning writes and reads our checkpoints.

    Writes go to a temporary file in the same folder, then a rename: a crash or a kill never leaves a half-written
    ``last.ckpt`` behind (os.replace is atomic on POSIX). A state with NaN/inf weights is refused, so the last good
    file stays. Reads (``ckpt_path=``, ``resume=auto``) never run code: ``weights_only=True`` whatever torch's
    default, through ``ldm.checkpoint``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        check_finite_state(checkpoint.get("state_dict", {}), str(path))
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_torch_file(path)


class ReconstructionGrid(pl.Callback):
    """After each validation, save inputs (top rows) over reconstructions (bottom rows) as a PNG in
    ``<run_dir>/images/`` and send it to the logger (TensorBoard/W&B)."""

    def __init__(self, dirpath: str, nrow: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.nrow = nrow

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grid_pair = getattr(pl_module, "_grid", None)
        if grid_pair is None or not trainer.is_global_zero or trainer.sanity_checking:
            return
        inputs, recons = grid_pair
        n = min(self.nrow, inputs.shape[0])
        grid = make_grid(torch.cat([inputs[:n], recons[:n]]), nrow=n, normalize=True, value_range=(-1, 1))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"val_step{trainer.global_step:07d}.png"
        save_image(grid, path)
        log_image(trainer, "val/reconstructions", grid, trainer.global_step, caption="top: inputs, bottom: reconstructions")


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` training steps (and at the end of training), sample ``images_per_prompt`` images
    for each of a fixed list of prompts with the EMA U-Net, and save them as a grid (one row per prompt) in
    ``<run_dir>/images/samples_stepNNNNNNN.png`` and to the logger. Same seed at every call, so successive grids
    show how the same noise is denoised as training goes on. A class-conditional model given captions (the
    default prompts) samples one row per class instead, the first ``len(prompts)`` classes."""

    def __init__(self, dirpath: str, prompts: list[str], every_n_steps: int = 1000, images_per_prompt: int = 4,
                 sampler: str = "dpmpp_2m", steps: int = 25, cfg_scale: float = 3.0, seed: int = 0) -> None:
        if not prompts:
            raise ValueError("SampleGrid needs at least one prompt (callbacks.sample_grid.prompts)")
        self.dirpath = Path(dirpath)
        self.prompts = list(prompts)
        self.every_n_steps = int(every_n_steps)
        self.images_per_prompt = int(images_per_prompt)
        self.sampler, self.steps, self.cfg_scale, self.seed = sampler, int(steps), float(cfg_scale), int(seed)
        self._last_step = -1

    def _grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        rows = labels = self.prompts
        encoder = getattr(pl_module, "text_encoder", None)
        if getattr(encoder, "input_key", "caption") == "label":
            names = pl_module.class_names
            if not all(str(p).isdigit() or p in names.values() for p in rows):
                rows = [str(c) for c in range(min(len(rows), encoder.num_classes))]
            labels = [f"{r} ({names[int(r)]})" if str(r).isdigit() and names.get(int(r)) else str(r) for r in rows]
        prompts = [p for p in rows for _ in range(self.images_per_prompt)]
        images = pl_module.sample_images(prompts, self.sampler, self.steps, self.cfg_scale, self.seed)
        grid = make_grid(images.cpu(), nrow=self.images_per_prompt, normalize=True, value_range=(-1, 1))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.dirpath / f"samples_step{step:07d}.png")
        (self.dirpath / "prompts.txt").write_text("\n".join(labels) + "\n")
        log_image(trainer, "samples", grid, step, caption=" | ".join(labels))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._grid(trainer, pl_module)


def log_image(trainer: pl.Trainer, key: str, grid: torch.Tensor, step: int, caption: str = "") -> None:
    """Send a [3,H,W] image in [0,1] to every logger that can show images."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard
            experiment.add_image(key, grid, step)
        elif hasattr(logger, "log_image"):  # W&B
            logger.log_image(key=key, images=[grid], step=step, caption=[caption])


class RankConsistencyCheck(pl.Callback):
    """At the end of training, compare a checksum of every parameter across DDP ranks and fail loudly if
    any rank diverged (e.g. a gradient that was never all-reduced). Writes ``rank_checksums.json``.

    The parameters are read as a checkpoint reads them (``state_dict``), so a module that defers an update (stage
    2's EMA, which waits for the bad-step guard's decision) applies it first, on every rank alike: a rank-0-only
    reader such as the sample grid may have applied it already on rank 0."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = pl_module.state_dict()
        params = [state[name] for name, _ in pl_module.named_parameters()]
        sums = torch.stack([p.detach().double().sum() for p in params])
        sq = torch.stack([p.detach().double().pow(2).sum() for p in params])
        local = torch.stack([sums, sq]).to(pl_module.device)
        gathered = pl_module.all_gather(local)  # [world, 2, P] (or [2, P] on one process)
        if gathered.dim() == 2:
            gathered = gathered[None]
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            per_rank = [{"sum": float(g[0].sum()), "sumsq": float(g[1].sum())} for g in gathered.cpu()]
            (self.dirpath / "rank_checksums.json").write_text(json.dumps(per_rank, indent=2))
        # every rank sees the gathered sums, so all raise together instead of leaving some in a barrier
        bad = [r for r in range(1, gathered.shape[0]) if not torch.equal(gathered[r], gathered[0])]
        if bad:
            raise RuntimeError(f"DDP ranks {bad} hold different parameters than rank 0 after training")


class Throughput(pl.Callback):
    """Log training images/s (all ranks together) and peak GPU memory; write ``perf.json`` at the end.

    The first ``warmup`` batches (compilation, cudnn autotuning, allocator growth) are left out of the rate.
    """

    def __init__(self, dirpath: str, warmup: int = 20, log_every: int = 50) -> None:
        self.dirpath = Path(dirpath)
        self.warmup = warmup
        self.log_every = log_every
        self._t0: float | None = None
        self._images = 0
        self._batches = 0

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        import time

        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches == self.warmup:
            self._t0 = self._now(pl_module)
            self._images = 0
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            return
        if self._t0 is None:
            return
        images = batch["image"] if "image" in batch else batch["mean"]  # stage 1 images / stage 2 latents
        self._images += images.shape[0] * trainer.world_size
        if self._batches % self.log_every == 0:
            pl_module.log("perf/images_per_s", self._images / (self._now(pl_module) - self._t0), rank_zero_only=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._t0 is None or not trainer.is_global_zero:
            return
        elapsed = self._now(pl_module) - self._t0
        summary = {
            "images_per_s": self._images / elapsed if elapsed > 0 else None,
            "timed_batches": self._batches - self.warmup,
            "timed_seconds": elapsed,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "device": torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda" else "cpu",
            "peak_memory_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            if pl_module.device.type == "cuda" else None,
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "perf.json").write_text(json.dumps(summary, indent=2))


class MonitorHistory(pl.Callback):
    """Every validation's value of the monitored metric, and the training time, kept in the checkpoints so a
    resumed or requeued run still knows its whole history. ``train.py`` reads it for a sweeper's objective
    (``ldm.sweeps.objective_value``) and the job's ``result.json``."""

    def __init__(self, monitor: str, inherit: bool = True) -> None:
        self.monitor = monitor
        self.inherit = inherit  # False: a run started from another run's checkpoint counts only its own
        self.values: list[tuple[int, float]] = []  # (global step, value)
        self.last_metrics: dict[str, float] = {}  # every val/ metric of the latest validation
        self._seconds_before = 0.0  # training time of earlier attempts (resumed runs)
        self._started: float | None = None
        self.attempts = 0  # times training started: 1 + resumes (requeues)

    @property
    def seconds(self) -> float:
        return self._seconds_before + (time.monotonic() - self._started if self._started is not None else 0.0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()
        self.attempts += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        step = int(trainer.global_step)
        self.values = [(s, v) for s, v in self.values if s != step] + [(step, float(value))]
        self.last_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "values": [list(v) for v in self.values], "seconds": self.seconds,
                "attempts": self.attempts, "last_metrics": self.last_metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.inherit:
            return
        self.last_metrics = dict(state_dict.get("last_metrics") or {})
        if state_dict.get("monitor") == self.monitor:  # another metric's values would mean nothing here
            self.values = [(int(s), float(v)) for s, v in state_dict.get("values", [])]
        self._seconds_before = float(state_dict.get("seconds", 0.0))
        self.attempts += int(state_dict.get("attempts", 0))


class StepProgressBar(TQDMProgressBar):
    """The training bar in optimizer steps out of ``trainer.max_steps`` across epochs (Lightning's counts the
    batches of one epoch), with the loss read every ``refresh_rate`` steps: a metric shown on Lightning's bar
    (``prog_bar=True``) is copied to the host every step, which stalls the GPU's queue each time."""

    def __init__(self, refresh_rate: int = 10, show: tuple[str, ...] = ("train/loss", "train/rec_loss",
                                                                       "train/d_loss")) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.show = show

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.n = bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description("train")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.set_description(f"train (epoch {trainer.current_epoch})", refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        for key in self.show:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                items[key.removeprefix("train/")] = f"{float(value):.4g}"
        return items
