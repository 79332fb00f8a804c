"""Lightning module for stage 2: a conditional U-Net on cached latents of a frozen autoencoder. Thin: sample
and normalise the cached posterior, encode (and randomly drop) the condition, call the diffusion loss, log.

The frozen autoencoder is kept inside the module and inside every checkpoint, so a stage-2 checkpoint alone is
enough to sample (``sample.py ckpt=...``); frozen text encoders are rebuilt from their own weights instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm.lit.guard import StepGuard, amp_scaler, poison_if_not_finite
from ldm.lit.optim import build_optimizer, scaled_learning_rate
from ldm.lit.resilience import restart_optimisation
from ldm.losses.diffusion import DiffusionLoss
from ldm.models.distributions import sample_posterior
from ldm.models.ema import ema_decay_at, ema_pairs, ema_update
from ldm.models.latent_stats import normalize_latents
from ldm.pipeline import LatentDiffusion, generate, training_condition
from ldm.runtime import autocast_dtype, compile_options, keyed_generator


class LatentDiffusionModule(pl.LightningModule):
    """Stage-2 training.

    Args:
        unet: ``UNetModel`` (``unet(x_t, t, context=, context_mask=)``).
        text_encoder: condition encoder; trained with the U-Net if ``text_encoder.trainable``.
        autoencoder: frozen stage-1 autoencoder (decodes the sample grids; stored in checkpoints).
        loss: ``DiffusionLoss`` (schedule, objective, weighting).
        latent_stats: the autoencoder's latent statistics (from its checkpoint, checked against the cache).
        optimizer / lr_scheduler: partial ``torch.optim`` constructors; the scheduler steps every optimizer step.
        base_learning_rate, scale_lr, batch_size, accumulate_grad_batches: lr = base (× batch × devices × accum if
            ``scale_lr``, the LDM convention).
        p_uncond: probability of replacing a sample's condition by the null condition (classifier-free guidance
            training, Ho & Salimans 2022).
        ema_decay: EMA of the U-Net used for validation and sampling (``None``: off).
        latent_norm: ``"scale"`` or ``"channel"`` (``ldm.models.latent_stats.normalize_latents``).
        latent_shape: ``(C, h, w)`` of a latent; set from the cache.
        run_config: resolved run config, stored in every checkpoint; ``meta``: extra checkpoint metadata
            (autoencoder identity, cache manifest summary).
        seed: the posterior/noise/timestep/dropout draws are a pure function of (seed, rank, step, batch).
        compile: ``torch.compile`` the U-Net (in place, so checkpoint keys do not change); a string names the
            mode (``ldm.runtime.compile_options``).
        channels_last: keep the U-Net's convolution weights and activations in NHWC (``torch.channels_last``), the
            layout cuDNN's bf16 kernels work in, instead of converting around every convolution.
        gradient_clip_val: clip the global grad norm (0/None: off); done here, with the non-finite check.
        max_consecutive_skips: stop the run after this many steps in a row with a non-finite loss or gradients
            (each is skipped: ``ldm.lit.guard.StepGuard``).
        history: the configs this run was trained under (see ``train.py``); stored in every checkpoint.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        autoencoder: nn.Module,
        loss: DiffusionLoss,
        latent_stats: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        base_learning_rate: float = 1e-4,
        scale_lr: bool = False,
        batch_size: int = 1,
        accumulate_grad_batches: int = 1,
        p_uncond: float = 0.1,
        ema_decay: float | None = 0.9999,
        latent_norm: str = "scale",
        latent_shape: Sequence[int] = (4, 8, 8),
        run_config: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        seed: int = 0,
        compile: bool | str = False,
        gradient_clip_val: float | None = None,
        max_consecutive_skips: int = 20,
        history: list[dict[str, Any]] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond={p_uncond} must be in [0, 1)")
        self.unet = unet
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.loss = loss
        self.latent_stats = latent_stats
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.base_learning_rate = base_learning_rate
        self.scale_lr = scale_lr
        self.batch_size = batch_size
        self.accumulate = max(1, int(accumulate_grad_batches))
        self.p_uncond = float(p_uncond)
        self.latent_norm = latent_norm
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.run_config = run_config or {}
        self.meta = meta or {}
        self.seed = int(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:  # before the EMA copy, which then has the same layout
            unet.to(memory_format=torch.channels_last)
        self.unet_ema = copy.deepcopy(unet).eval().requires_grad_(False) if ema_decay else None
        self.ema_decay = ema_decay
        self.gradient_clip_val = gradient_clip_val
        self.guard = StepGuard(max_consecutive_skips)
        self.history = list(history or [])
        self._resumed = False
        self._ema_pairs = None
        self._ema_due: tuple[int, float] | None = None  # (step, decay) of an EMA update waiting for its guard decision
        if (options := compile_options(compile)) is not None:
            self.unet.compile(**options)

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.autoencoder.eval()  # frozen parts never switch to training behaviour
        if self.unet_ema is not None:
            self.unet_ema.eval()
        return self

    # ----------------------------------------------------------------------------------------------- setup
    def learning_rate(self) -> float:
        return scaled_learning_rate(self.base_learning_rate, self.scale_lr, self.batch_size, self.trainer.world_size,
                                    self.accumulate)

    def configure_optimizers(self):
        params = list(self.unet.parameters())
        if getattr(self.text_encoder, "trainable", False):
            params += list(self.text_encoder.parameters())
        opt = build_optimizer(self.optimizer_factory, params, self.learning_rate())
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def on_train_end(self) -> None:
        self._ema_catch_up()
        self.guard.finish()  # the skip decisions not read yet (StepGuard reads them a step late)

    def on_train_start(self) -> None:
        self._ema_pairs = None
        self._ema_due = None
        if self._resumed:  # the new config's optimizer settings and LR schedule, at the resumed step
            restart_optimisation(self, [self.optimizer_factory], self.learning_rate(), self.lr_scheduler_factory)

    # ---------------------------------------------------------------------------------------------- train
    def _diffusion_loss(self, unet: nn.Module, batch: dict[str, Any], gen: torch.Generator, p_uncond: float):
        z = sample_posterior(batch["mean"], batch["logvar"], generator=gen)
        z = normalize_latents(z, self.latent_stats, self.latent_norm)
        keep = torch.rand(z.shape[0], generator=gen, device=z.device) >= p_uncond
        cond = training_condition(self.text_encoder, batch, keep)
        fmt = self.memory_format
        return self.loss(lambda x, t: unet(x.contiguous(memory_format=fmt), t, **cond), z, generator=gen)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.guard.begin_step(self)
        # keyed on the step and the micro-batch within it, not on Lightning's batch_idx, which a resume can shift
        gen = keyed_generator(self.device, self.seed, self.global_rank, self.global_step, batch_idx % self.accumulate)
        loss, logs = self._diffusion_loss(self.unet, batch, gen, self.p_uncond)
        self.log("train/loss", loss, batch_size=batch["mean"].shape[0])  # shown by StepProgressBar, not prog_bar
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"}, batch_size=batch["mean"].shape[0])
        if "n_bad" in batch:
            self.log("data/skipped", batch["n_bad"].sum().float(), reduce_fx="sum", on_step=False, on_epoch=True,
                     sync_dist=True)
        return poison_if_not_finite(loss)

    def on_before_optimizer_step(self, optimizer) -> None:
        self._ema_catch_up()  # the previous step's EMA, before this step moves the weights it follows
        # after AMP unscaling (16-mixed), so the clip threshold is in true gradient units; non-finite gradients
        # are dropped here, so the step applies nothing
        self.guard.check(optimizer, self.gradient_clip_val, amp_scaler(self.trainer))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.unet_ema is not None:
            decay = ema_decay_at(step, self.ema_decay)
            if isinstance(self.guard.last_applied, Tensor):  # decided on the device: the update waits (_ema_catch_up)
                self._ema_due = (step, decay)
            else:
                self._ema_update(decay, self.guard.last_applied)
        self.guard.end_step(step)
        self.log("train/skipped_steps", torch.tensor(float(self.guard.total)))  # CPU: no copy to the GPU

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # the same noise, timesteps and posterior draws at every validation, and no condition dropout
        gen = keyed_generator(self.device, self.seed, -1, batch_idx, self.global_rank)
        loss, logs = self._diffusion_loss(self.sampling_unet(), batch, gen, p_uncond=0.0)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["mean"].shape[0])
        # the same quantity for every objective / weighting: what a sweep over them compares (hparams_search)
        self.log("val/eps_mse", logs["eps_mse"], sync_dist=True, batch_size=batch["mean"].shape[0])

    # ------------------------------------------------------------------------------------------- sampling
    def _ema_catch_up(self) -> None:
        """The EMA update of the latest optimizer step, if still due.

        The EMA follows only applied updates. When the bad-step guard decides on the device (a fused optimizer),
        the update waits until that decision is on the host: in the next step, once its backward is queued (when
        the guard's copy of the decision has long arrived), and before its optimizer moves the weights. Then it
        is one plain multi-tensor ``lerp``, instead of an update weighted on the device (three multi-tensor ops
        and scratch memory: the largest host cost ``train.py`` had over a hand-written loop). Every reader of the
        EMA (``state_dict``, so any checkpoint; sampling; validation; the end of training) catches up first."""
        if self._ema_due is None:
            return
        step, decay = self._ema_due
        self._ema_due = None
        self._ema_update(decay, self.guard.applied_at(step))

    def _ema_update(self, decay: float, applied: bool) -> None:
        self._ema_pairs = self._ema_pairs or ema_pairs(self.unet_ema, self.unet)  # matched once per fit
        ema_update(self.unet_ema, self.unet, decay, applied=applied, pairs=self._ema_pairs)

    def state_dict(self, *args, **kwargs):
        self._ema_catch_up()  # a checkpoint, saved at any hook, holds the EMA of every update it holds
        return super().state_dict(*args, **kwargs)

    def sampling_unet(self) -> nn.Module:
        self._ema_catch_up()
        return self.unet_ema if self.unet_ema is not None else self.unet

    def pipeline(self) -> LatentDiffusion:
        return LatentDiffusion(
            unet=self.sampling_unet(), text_encoder=self.text_encoder, autoencoder=self.autoencoder,
            alphas_cumprod=self.loss.alphas_cumprod, objective=self.loss.objective, latent_stats=self.latent_stats,
            latent_norm=self.latent_norm, latent_shape=self.latent_shape,
            class_names=self.class_names,
        )

    @property
    def class_names(self) -> dict[int, str]:
        """A class model's ``{label: name}`` from its cache's ``classes.json`` (stored as checkpoint metadata)."""
        return {int(k): v for k, v in (self.meta.get("class_names") or {}).items()}

    @torch.no_grad()
    def sample_images(self, prompts: Sequence[Any], sampler: str, steps: int, cfg_scale: float, seed: int,
                      **options: Any) -> Tensor:
        """Images ``[N,3,H,W]`` in [-1,1] from the EMA U-Net (same seed: same noise at every call)."""
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        autocast = autocast_dtype("auto", self.device)  # bf16 on GPUs that have it
        try:
            return generate(self.pipeline(), prompts, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                            generator=gen, sampler_options=options, autocast_dtype=autocast)
        finally:
            self.text_encoder.train(was_training)

    # ----------------------------------------------------------------------------------------- checkpoint
    def _frozen_prefixes(self) -> tuple[str, ...]:
        # frozen text encoders are rebuilt from their own pretrained weights (identity checked), not stored
        return () if getattr(self.text_encoder, "trainable", False) else ("text_encoder.",)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(self._frozen_prefixes())]:
            del state[key]
        checkpoint["ldm"] = {
            "stage": "ldm", "config": self.run_config, "latent_stats": self.latent_stats,
            "latent_norm": self.latent_norm, "latent_shape": list(self.latent_shape),
            "text_encoder": self.text_encoder.identity(), **self.meta,
            "history": self.history, "guard": self.guard.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint.get("ldm", {}).get("guard"))
        self._resumed = True
        prefixes = self._frozen_prefixes()
        if prefixes:
            checkpoint["state_dict"].update({k: v for k, v in self.state_dict().items() if k.startswith(prefixes)})
