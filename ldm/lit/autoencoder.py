"""Lightning module for stage 1 (KL or VQ autoencoder + PatchGAN). Thin: unpack, call the loss, step, log.

Manual optimisation because the generator and the discriminator alternate with their own optimizers
(Rombach et al. 2022, App. G; Esser et al. 2021). ``global_step`` counts generator updates only, so that
``trainer.max_steps``, ``disc_start``, logging and Lightning's resume bookkeeping all mean "training steps".
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm.lit.guard import StepGuard, amp_scaler, poison_if_not_finite
from ldm.lit.optim import build_optimizer, closes_window, scaled_learning_rate
from ldm.lit.resilience import restart_optimisation
from ldm.losses.autoencoder import FirstStageLoss
from ldm.metrics.image_quality import psnr, ssim
from ldm.models.ema import ema_decay_at, ema_pairs, ema_update
from ldm.runtime import compile_options, keyed_generator


class AutoencoderModule(pl.LightningModule):
    """Stage-1 training.

    Args:
        autoencoder: ``AutoencoderKL`` or ``VQModel``.
        loss: ``AutoencoderLoss`` or ``VQAutoencoderLoss`` (owns discriminator, LPIPS and, for KL, log-variance).
        optimizer: partial ``torch.optim`` constructor for the autoencoder (+ the loss's generator parameters).
        disc_optimizer: partial constructor for the discriminator.
        lr_scheduler: optional partial ``torch.optim.lr_scheduler`` applied to both optimizers, stepped once per
            training step (generator update).
        base_learning_rate: if ``scale_lr``, lr = base × batch × devices × accumulation (LDM convention),
            else lr = base.
        batch_size: per-device batch size (for the LR scaling).
        accumulate_grad_batches: optimizer steps every N batches (manual optimisation does it here).
        gradient_clip_val: clip the global grad norm of each optimizer's parameters (0/None: off).
        run_config: the resolved run config (plain dict), stored in every checkpoint.
        seed: posterior sampling noise is a pure function of (seed, rank, step, batch), so a resumed run draws
            exactly the noise an uninterrupted run would have drawn.
        grid_images: how many validation images go into the input/reconstruction grid.
        ema_decay: keep an EMA of the autoencoder weights (``autoencoder_ema``), used for validation, latent
            statistics and everything built from the checkpoint. ``None``: off.
        max_consecutive_skips: stop the run (``NonFiniteTrainingError``) after this many training steps in a row
            whose loss or gradients were not finite (each one is skipped: ``ldm.lit.guard.StepGuard``).
        history: the configs this run was trained under (``train.py`` appends one entry per resume that changed
            settings); stored in every checkpoint.
        compile: ``torch.compile`` the training graph's parts in place (checkpoint keys unchanged): the encoder, the
            decoder, the LPIPS network and the discriminator. The posterior sample and the losses' small glue
            stay eager. A string names the mode (``ldm.runtime.compile_options``).
        channels_last: keep the convolution weights and the training activations in NHWC (``torch.channels_last``),
            the layout cuDNN's bf16 kernels work in, instead of converting around every convolution.
        latent_stats: set after training (scale and per-channel mean/std); stored in checkpoints.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        loss: FirstStageLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        disc_optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        base_learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        batch_size: int = 1,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        run_config: dict[str, Any] | None = None,
        seed: int = 0,
        grid_images: int = 8,
        ema_decay: float | None = None,
        max_consecutive_skips: int = 20,
        history: list[dict[str, Any]] | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:  # before the EMA copy, which then has the same layout (one kernel per EMA update)
            for part in (autoencoder, loss.perceptual, loss.discriminator):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        self.autoencoder = autoencoder
        self.loss = loss
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.base_learning_rate = base_learning_rate
        self.scale_lr = scale_lr
        self.batch_size = batch_size
        self.accumulate = max(1, int(accumulate_grad_batches))
        self.gradient_clip_val = gradient_clip_val
        self.run_config = run_config or {}
        self.seed = int(seed)
        self.grid_images = grid_images
        self.latent_stats: dict[str, Any] | None = None
        self.ema_decay = ema_decay
        self.autoencoder_ema = copy.deepcopy(autoencoder).requires_grad_(False) if ema_decay else None
        self._grid: tuple[Tensor, Tensor] | None = None
        self.guard = StepGuard(max_consecutive_skips)
        self.history = list(history or [])
        self._resumed = False
        self._ema_pairs = None
        self._window_open = False  # an accumulation window with gradients not yet stepped
        if (options := compile_options(compile)) is not None:  # after the EMA copy, which only validates
            for part in (autoencoder.encoder, loss.perceptual, loss.discriminator):
                if part is not None:
                    part.compile(**options)
            # the decoder's output conv stays out of its graph: the adaptive GAN weight differentiates it alone
            decoder = autoencoder.decoder
            decoder.features = torch.compile(decoder.features, **options)

    # ----------------------------------------------------------------------------------------------- setup
    def learning_rate(self) -> float:
        return scaled_learning_rate(self.base_learning_rate, self.scale_lr, self.batch_size, self.trainer.world_size,
                                    self.accumulate)

    def configure_optimizers(self):
        lr = self.learning_rate()
        gen_params = [p for p in self.autoencoder.parameters() if p.requires_grad]  # an EMA codebook is not
        gen_params += self.loss.generator_parameters()
        opt_g = build_optimizer(self.optimizer_factory, gen_params, lr)
        opt_d = build_optimizer(self.disc_optimizer_factory, self.loss.discriminator.parameters(), lr)
        if self.lr_scheduler_factory is None:
            return [opt_g, opt_d]
        return [opt_g, opt_d], [self.lr_scheduler_factory(opt_g), self.lr_scheduler_factory(opt_d)]

    # ---------------------------------------------------------------------------------------------- train
    def on_train_end(self) -> None:
        self.guard.finish()  # the skip decisions not read yet (StepGuard reads them a step late)

    def on_train_start(self) -> None:
        self._ema_pairs = None
        if self._resumed:  # the new config's optimizer settings and LR schedule, at the resumed step
            restart_optimisation(self, [self.optimizer_factory, self.disc_optimizer_factory], self.learning_rate(),
                                 self.lr_scheduler_factory)

    def _update(self, opt, loss: Tensor, do_step: bool, counts_as_step: bool = True) -> None:
        self.manual_backward(poison_if_not_finite(loss) / self.accumulate)
        if do_step:
            if counts_as_step:
                opt.step()
            else:  # the strategy's step (precision plugin, AMP scaler, hooks) without Lightning's step count
                self.trainer.strategy.optimizer_step(opt.optimizer, closure=_no_closure)
            opt.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this inside `opt.step()` after AMP has unscaled the gradients (16-mixed), so the
        # threshold is in true gradient units; clipping before `opt.step()` would see loss-scaled gradients.
        # Non-finite gradients are dropped here, so the step applies nothing.
        self.guard.check(optimizer, self.gradient_clip_val, amp_scaler(self.trainer))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x = batch["image"].contiguous(memory_format=self.memory_format)
        step = self.global_step  # generator updates so far
        do_step = closes_window(self.trainer, batch_idx, self.accumulate)
        self._window_open = not do_step

        # keyed on the step and the micro-batch within it, not on Lightning's batch_idx, which a resume can shift
        noise = keyed_generator(x.device, self.seed, self.global_rank, step, batch_idx % self.accumulate)

        self.guard.begin_step(self)
        self.toggle_optimizer(opt_g)
        recon, posterior = self.autoencoder(x, generator=noise)
        scaler = amp_scaler(self.trainer)  # 16-mixed: the adaptive weight's gradients are taken at the loss scale
        scale = scaler.scale(torch.ones((), device=x.device)) if scaler is not None else None
        g_loss, logs = self.loss.generator_loss(x, recon, posterior, step, self.autoencoder.get_last_layer(), scale)
        self._update(opt_g, g_loss, do_step)
        generator_applied = self.guard.last_applied
        self.untoggle_optimizer(opt_g)

        if self.loss.discriminator_active(step):
            self.toggle_optimizer(opt_d)
            d_loss, d_logs = self.loss.discriminator_step_loss(x, recon, step)
            self._update(opt_d, d_loss, do_step, counts_as_step=False)
            self.untoggle_optimizer(opt_d)
            logs.update(d_logs)

        self.log_dict({f"train/{k}": v for k, v in logs.items()})  # the bar (StepProgressBar) reads them
        if do_step and self.autoencoder_ema is not None:
            self._ema_pairs = self._ema_pairs or ema_pairs(self.autoencoder_ema, self.autoencoder)  # once per fit
            ema_update(self.autoencoder_ema, self.autoencoder, ema_decay_at(step, self.ema_decay),
                       applied=generator_applied, pairs=self._ema_pairs)
        if do_step:
            self.guard.end_step(step)
            self.log("train/skipped_steps", torch.tensor(float(self.guard.total)))  # CPU: no copy to the GPU
        if do_step and self.lr_scheduler_factory is not None:
            with warnings.catch_warnings():  # the discriminator's schedule runs before its start (disc_start)
                warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)` before `optimizer\.step")
                for scheduler in self.lr_schedulers():
                    scheduler.step()
        if "n_bad" in batch:
            self.log("data/skipped", batch["n_bad"].sum().float(), reduce_fx="sum", on_step=False, on_epoch=True,
                     sync_dist=True)

    # ----------------------------------------------------------------------------------------- validation
    def on_validation_model_zero_grad(self) -> None:
        if not self._window_open:  # mid-window the gradients are the accumulation's partial sum: kept
            super().on_validation_model_zero_grad()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        model = self.autoencoder_ema if self.autoencoder_ema is not None else self.autoencoder
        posterior = model.encode(x)
        recon = model.decode(posterior.mode())
        x32, r32 = x.float(), recon.float().clamp(-1, 1)
        metrics = {
            "val/rec_loss": (x32 - r32).abs().mean(),
            "val/psnr": psnr(x32, r32).mean(),
            "val/ssim": ssim(x32, r32).mean(),
        }
        if self.loss.perceptual is not None:
            metrics["val/lpips"] = self.loss.perceptual(x32, r32).float().mean()
        self.log_dict(metrics, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0:
            n = min(self.grid_images, x.shape[0])
            self._grid = (x32[:n].detach().cpu(), r32[:n].detach().cpu())

    # ----------------------------------------------------------------------------------------- checkpoint
    # The frozen LPIPS net (58 MB for VGG) is rebuilt from its pretrained weights, never stored in checkpoints.
    _FROZEN_PREFIX = "loss.perceptual."

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self._FROZEN_PREFIX)]:
            del state[key]
        checkpoint["ldm"] = {"stage": "autoencoder", "config": self.run_config, "latent_stats": self.latent_stats,
                             "history": self.history, "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.latent_stats = checkpoint.get("ldm", {}).get("latent_stats")
        self.guard.load_state_dict(checkpoint.get("ldm", {}).get("guard"))
        self._resumed = True
        own = {k: v for k, v in self.state_dict().items() if k.startswith(self._FROZEN_PREFIX)}
        checkpoint["state_dict"].update(own)


def _no_closure() -> None:  # the losses were back-propagated before the step
    return None
