"""Samplers for the discrete-time VP diffusion: DDPM, DDIM and DPM-Solver++(2M) (pure functions).

All share one signature::

    sampler(denoise, x, alphas_cumprod, steps, generator, *, callback=None, spacing="trailing",
            timesteps=None, **opts) -> x0

- ``denoise(x_t [B, ...], t LongTensor [B]) -> x0_hat [B, ...]``: the denoised estimate at integer timestep t
  (build one from a network with ``guidance.model_denoiser`` / ``guidance.cfg_denoiser``).
- ``x``: the starting sample at the first timestep, normally ``initial_noise(...)`` (N(0, I)).
- ``alphas_cumprod``: ab_t, [T] (any float dtype/device; the schedule maths is done in float64 on the CPU and
  only per-step scalars touch ``x``).
- ``steps``: how many denoiser calls; the timesteps are ``schedules.spaced_timesteps(T, steps, spacing)``
  unless ``timesteps`` (strictly decreasing ints) is given, whose length must then equal ``steps``.
- ``generator``: the only source of randomness (stochastic samplers raise without one); noise is drawn on the
  generator's device, so a CPU generator reproduces the same samples on any device.
- ``callback(i, x)``: called after step ``i`` (0-based) with the current sample.

After the last listed timestep every sampler steps to clean data (``ab = 1``; diffusers' ``set_alpha_to_one`` /
``final_sigmas_type="zero"``), so the result is the last denoised estimate pushed through the update rule.
The running sample is kept in float32 (float64 if ``x`` is float64) and returned in ``x.dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ldm.diffusion.objectives import randn
from ldm.diffusion.schedules import check_timesteps, spaced_timesteps

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor], None]
Sampler = Callable[..., Tensor]


def initial_noise(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``N(0, I)`` starting sample of ``shape`` (e.g. [B, C, h, w]), drawn on the generator's device and moved
    to ``device``: the noise for a seed does not depend on where sampling runs."""
    return randn(tuple(shape), generator, torch.device(device), dtype)


def sampling_plan(
    alphas_cumprod: Tensor,
    steps: int,
    spacing: str = "trailing",
    timesteps: Sequence[int] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Timesteps to visit and their ab, with the clean endpoint appended.

    Returns ``ts`` int64 [S] (descending) and ``ab`` float64 [S + 1] on the CPU, where ``ab[i] =
    alphas_cumprod[ts[i]]`` and ``ab[S] = 1`` (the "timestep -1" of clean data).
    """
    ab_all = alphas_cumprod.detach().to("cpu", torch.float64)
    if ab_all.ndim != 1:
        raise ValueError(f"alphas_cumprod must be 1-D [T], got shape {tuple(ab_all.shape)}")
    num_timesteps = ab_all.shape[0]
    if timesteps is None:
        ts = spaced_timesteps(num_timesteps, steps, spacing)
    else:
        ts = torch.as_tensor(timesteps).to("cpu").reshape(-1)
        check_timesteps(ts, num_timesteps)
        ts = ts.to(torch.int64)
        if ts.numel() != steps:
            raise ValueError(
                f"got {ts.numel()} explicit timesteps but steps={steps}; pass steps=len(timesteps)"
            )
    ab = torch.cat([ab_all[ts], torch.ones(1, dtype=torch.float64)])
    return ts, ab


def _state_dtype(x: Tensor) -> torch.dtype:
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    return torch.promote_types(torch.float32, x.dtype)


def _call(denoise: Denoiser, x: Tensor, t: int) -> Tensor:
    """Denoise the whole batch at integer timestep ``t``; result in ``x``'s dtype."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    x0 = denoise(x, t_batch)
    if x0.shape != x.shape:
        raise ValueError(
            f"denoise returned shape {tuple(x0.shape)} for input {tuple(x.shape)}; it must match"
        )
    return x0.to(x.dtype)


def _need_generator(generator: torch.Generator | None, name: str) -> None:
    if generator is None:
        raise ValueError(
            f"{name} draws noise at every step: pass a torch.Generator (e.g. torch.Generator().manual_seed(0))"
        )


@torch.no_grad()
def ddpm(denoise: Denoiser, x: Tensor, alphas_cumprod: Tensor, steps: int, generator: torch.Generator | None,
         *, callback: Callback | None = None, spacing: str = "trailing",
         timesteps: Sequence[int] | Tensor | None = None) -> Tensor:
    """Ancestral sampling from the DDPM posterior ``q(x_prev | x_t, x0_hat)`` (Ho et al. 2020, Eq. 6-7).

    On a subsequence of timesteps the chain is "respaced" (Nichol & Dhariwal 2021, Sec. 4): between consecutive
    visited steps ``t -> p`` the effective ``beta = 1 - ab_t / ab_p``, and the posterior has
    mean ``sqrt(ab_p) beta / (1 - ab_t) * x0 + sqrt(1 - beta) (1 - ab_p) / (1 - ab_t) * x_t`` and
    variance ``(1 - ab_p) / (1 - ab_t) * beta`` (the "fixed small" variance; zero on the step to clean data).
    """
    _need_generator(generator, "ddpm")
    ts, ab = sampling_plan(alphas_cumprod, steps, spacing, timesteps)
    out_dtype, x = x.dtype, x.to(_state_dtype(x))
    for i, t in enumerate(ts.tolist()):
        ab_t, ab_p = float(ab[i]), float(ab[i + 1])
        beta = 1 - ab_t / ab_p
        x0 = _call(denoise, x, t)
        c_x0 = math.sqrt(ab_p) * beta / (1 - ab_t)
        c_xt = math.sqrt(1 - beta) * (1 - ab_p) / (1 - ab_t)
        var = (1 - ab_p) / (1 - ab_t) * beta
        x = c_x0 * x0 + c_xt * x
        if var > 0:
            x = x + math.sqrt(var) * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback(i, x)
    return x.to(out_dtype)


@torch.no_grad()
def ddim(denoise: Denoiser, x: Tensor, alphas_cumprod: Tensor, steps: int, generator: torch.Generator | None,
         *, callback: Callback | None = None, spacing: str = "trailing",
         timesteps: Sequence[int] | Tensor | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12): ``x_p = sqrt(ab_p) x0 + sqrt(1 - ab_p - sigma^2) eps + sigma z``.

    ``eps = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)`` is the noise implied by the denoised estimate and
    ``sigma = eta * sqrt((1 - ab_p) / (1 - ab_t)) * sqrt(1 - ab_t / ab_p)`` (their Eq. 16): ``eta = 0`` is the
    deterministic probability-flow-like sampler (no generator needed), ``eta = 1`` equals :func:`ddpm`.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0:
        _need_generator(generator, "ddim with eta > 0")
    ts, ab = sampling_plan(alphas_cumprod, steps, spacing, timesteps)
    out_dtype, x = x.dtype, x.to(_state_dtype(x))
    for i, t in enumerate(ts.tolist()):
        ab_t, ab_p = float(ab[i]), float(ab[i + 1])
        x0 = _call(denoise, x, t)
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p))
        # max(0, .) guards the rounding of 1 - ab_p - sigma^2 when eta = 1 on the last noisy step
        x = math.sqrt(ab_p) * x0 + math.sqrt(max(1 - ab_p - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback(i, x)
    return x.to(out_dtype)


@torch.no_grad()
def dpmpp_2m(denoise: Denoiser, x: Tensor, alphas_cumprod: Tensor, steps: int, generator: torch.Generator | None,
             *, callback: Callback | None = None, spacing: str = "trailing",
             timesteps: Sequence[int] | Tensor | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): deterministic, second order, multistep.

    Works in ``lambda = log(alpha / sigma)`` (``alpha = sqrt(ab)``, ``sigma = sqrt(1 - ab)``) on the
    data-prediction ODE. With ``h = lambda_next - lambda_cur``, the exponential-integrator update is
    ``x_next = (sigma_next / sigma_cur) x - alpha_next (exp(-h) - 1) D`` where
    ``D = x0_cur`` (first order; used on the first step, which has no history) or
    ``D = (1 + 1/(2r)) x0_cur - 1/(2r) x0_prev`` with ``r = h_prev / h`` (second-order multistep correction).
    The last step goes to ``sigma = 0``, i.e. ``lambda = +inf``: there ``r = 0`` and the correction diverges,
    while the first-order update has the finite limit ``x_next = x0_cur`` -- which is what we (and k-diffusion,
    and diffusers with ``final_sigmas_type="zero"``) return.
    """
    ts, ab = sampling_plan(alphas_cumprod, steps, spacing, timesteps)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)  # lam[-1] = +inf (clean data)
    out_dtype, x = x.dtype, x.to(_state_dtype(x))
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts.tolist()):
        x0 = _call(denoise, x, t)
        if i == len(ts) - 1:
            x = x0
        else:
            h = float(lam[i + 1] - lam[i])
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            # -expm1(-h) = 1 - exp(-h), computed without cancellation for small h
            x = float(sigma[i + 1] / sigma[i]) * x + float(alpha[i + 1]) * (-math.expm1(-h)) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x)
    return x.to(out_dtype)


SAMPLERS: dict[str, Sampler] = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by name in :data:`SAMPLERS`, with an error listing the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
