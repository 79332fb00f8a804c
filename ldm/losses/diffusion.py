"""Stage-2 training loss: the denoising objective of the LDM paper (Rombach et al. 2022, Eq. 2/Eq. 3),
``E_{x0, eps, t} || target - model(x_t, t) ||^2`` with a choice of schedule, objective and weighting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ldm.diffusion.objectives import (
    WEIGHTINGS,
    check_objective,
    loss_weight,
    q_sample,
    sample_noise,
    to_eps,
    training_target,
)
from ldm.diffusion.schedules import make_alphas_cumprod, snr


class DiffusionLoss(nn.Module):
    """Noise-prediction (or v / x0) regression loss with uniform or min-SNR weighting.

    Args:
        schedule: ``"linear"`` (paper, sqrt-space 0.00085 -> 0.012), ``"cosine"`` or ``"linear_plain"``.
        num_timesteps: T, the number of discrete training timesteps (paper: 1000).
        objective: what the network predicts: ``"eps"`` (paper), ``"v"`` or ``"x0"``.
        weighting: ``"uniform"`` (paper) or ``"min_snr"`` (Hang et al. 2023).
        min_snr_gamma: gamma of min-SNR weighting (their recommended 5).
        offset_noise: strength of per-sample-per-channel offset noise (Guttenberg 2023; 0 = off, ~0.1 typical).
        schedule_kwargs: extra arguments of the schedule function (e.g. ``{"beta_start": ..., "beta_end": ...}``).

    ``alphas_cumprod`` is a float64 buffer (not saved in state dicts: it is rebuilt from the arguments) that
    follows the module's device but keeps float64 through ``.half()`` / ``.to(torch.bfloat16)``.
    """

    alphas_cumprod: Tensor

    def __init__(
        self,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        objective: str = "eps",
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        schedule_kwargs: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        check_objective(objective)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
        if weighting == "min_snr" and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
        self.schedule = schedule
        self.num_timesteps = num_timesteps
        self.objective = objective
        self.weighting = weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.offset_noise = float(offset_noise)
        ab = make_alphas_cumprod(schedule, num_timesteps, **(schedule_kwargs or {}))
        self.register_buffer("alphas_cumprod", ab, persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # Follow device moves but never dtype casts: in bf16, 1 - ab_t rounds to 0 for the first timesteps.
        ab = self.alphas_cumprod
        super()._apply(fn, recurse)
        self.alphas_cumprod = ab.to(device=self.alphas_cumprod.device, dtype=torch.float64)
        return self

    def forward(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One Monte-Carlo estimate of the loss on a batch of clean (normalised) latents.

        Args:
            model_fn: ``model_fn(x_t [B, ...] float32, t LongTensor [B]) -> raw output [B, ...]`` (the caller
                closes over the conditioning).
            x0: clean samples [B, ...] (e.g. latents [B, C, h, w], roughly unit variance).
            generator: source of t and noise (global RNG if None); draws happen on its device.

        Returns:
            ``loss``: scalar float32, mean over the batch of ``weight(t) * mean((out - target)^2)``;
            ``logs``: detached scalars ``{"loss", "loss_uniform" (the unweighted MSE), "eps_mse" (the MSE of the
            noise estimate the output implies, whatever the objective)}``.
        """
        if x0.ndim < 1 or x0.shape[0] == 0:
            raise ValueError(f"x0 must be a non-empty batch [B, ...], got shape {tuple(x0.shape)}")
        batch = x0.shape[0]
        gen_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device).to(
            x0.device
        )
        noise = sample_noise(x0, generator, self.offset_noise)
        ab = self.alphas_cumprod.to(x0.device)[t]  # float64 [B]
        x0 = x0.to(noise.dtype)
        x_t = q_sample(x0, noise, ab).to(noise.dtype)
        target = training_target(self.objective, x0, noise, ab).to(noise.dtype)

        out = model_fn(x_t, t)
        if out.shape != target.shape:
            raise ValueError(
                f"model output has shape {tuple(out.shape)} but the {self.objective!r} target has shape "
                f"{tuple(target.shape)}; the network's out_channels must equal the latent channels"
            )
        # The MSE and weights are computed in float32 even when the network ran under bf16/fp16 autocast.
        mse = (out.float() - target.float()).pow(2).reshape(batch, -1).mean(dim=1)
        weight = loss_weight(self.objective, snr(ab), self.weighting, self.min_snr_gamma).float()
        loss = (weight * mse).mean()
        with torch.no_grad():  # comparable across objectives and weightings (e.g. in a sweep): the noise-space MSE
            eps_mse = mse if self.objective == "eps" else (
                to_eps(self.objective, x_t, out.detach(), ab).float() - noise.float()).pow(2).reshape(batch, -1).mean(1)
        logs = {"loss": loss.detach(), "loss_uniform": mse.mean().detach(), "eps_mse": eps_mse.mean().detach()}
        return loss, logs

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule!r}, num_timesteps={self.num_timesteps}, objective={self.objective!r}, "
            f"weighting={self.weighting!r}, min_snr_gamma={self.min_snr_gamma}, offset_noise={self.offset_noise}"
        )
