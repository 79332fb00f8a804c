"""Noise schedules of the discrete-time variance-preserving diffusion (pure functions, float64).

The forward process is ``x_t = sqrt(ab_t) * x0 + sqrt(1 - ab_t) * eps`` for integer ``t in [0, T)``
(Ho et al. 2020, Eq. 4), where ``ab_t = prod_{s<=t} (1 - beta_s)`` is ``alphas_cumprod[t]``. Everything here
returns float64 CPU tensors: ``1 - ab_t`` near ``t = 0`` is ~1e-3 and ``ab_t`` near ``t = T-1`` is ~5e-3 (paper
schedule) or ~1e-9 (cosine), so the schedule is kept in double precision and cast only where it is used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine", "linear_plain")
SPACINGS = ("trailing", "leading", "linspace")


def betas_scaled_linear(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """The LDM paper's "linear" schedule: betas linear in sqrt-space, ``beta_t = (lerp(sqrt(b0), sqrt(b1), t))^2``.

    Used by every LDM text-to-image model and Stable Diffusion (CompVis ``make_beta_schedule("linear")`` with
    ``linear_start=0.00085, linear_end=0.012``; diffusers calls it ``"scaled_linear"``). Returns float64 [T].
    """
    _check_num_timesteps(num_timesteps)
    root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64)
    return root**2


def betas_linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """Betas linear in t, 1e-4 -> 2e-2 (Ho et al. 2020, Sec. 4). Returns float64 [T]."""
    _check_num_timesteps(num_timesteps)
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def betas_cosine(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): ``ab(t) = cos^2((t/T + s) / (1 + s) * pi/2)``.

    The betas ``1 - ab(t+1)/ab(t)`` are clipped at ``max_beta`` (their Sec. 3.2) because the last one would be 1
    (``ab(T) = 0``), which makes ``x_T`` carry no signal and the eps->x0 conversion singular. Returns float64 [T].
    """
    _check_num_timesteps(num_timesteps)
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """``ab_t = prod_{s<=t} (1 - beta_s)``: float64 [T], strictly decreasing in (0, 1) for betas in (0, 1)."""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


def make_betas(name: str, num_timesteps: int = 1000, **kwargs: float) -> Tensor:
    """Betas of a named schedule: ``"linear"`` (paper, sqrt-space 0.00085 -> 0.012), ``"cosine"``,
    ``"linear_plain"`` (DDPM, 1e-4 -> 2e-2). ``kwargs`` go to the schedule function (e.g. ``beta_start``).
    Returns float64 [num_timesteps]."""
    makers = {"linear": betas_scaled_linear, "cosine": betas_cosine, "linear_plain": betas_linear}
    if name not in makers:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {list(makers)}")
    return makers[name](num_timesteps, **kwargs)


def make_alphas_cumprod(name: str, num_timesteps: int = 1000, **kwargs: float) -> Tensor:
    """``alphas_cumprod`` (ab_t, float64 [num_timesteps]) of a named schedule; see :func:`make_betas`."""
    return alphas_cumprod_from_betas(make_betas(name, num_timesteps, **kwargs))


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio ``ab / (1 - ab)`` (Kingma et al. 2021), elementwise, same shape and dtype."""
    return alphas_cumprod / (1 - alphas_cumprod)


def log_snr(alphas_cumprod: Tensor) -> Tensor:
    """``log(ab / (1 - ab)) = 2 * lambda`` where ``lambda = log(alpha / sigma)`` (Lu et al. 2022)."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing", offset: int = 0) -> Tensor:
    """The ``steps`` integer timesteps a sampler visits, in sampling order (descending), int64 [steps].

    Spacings (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2; the
    same arithmetic as diffusers' DDIM/DDPM ``timestep_spacing``):

    - ``"trailing"`` (default): ``round(T - k*T/steps) - 1``; starts at ``T - 1`` so sampling starts where the
      forward process is (nearly) pure noise, which is where the caller's ``N(0, I)`` initial ``x`` belongs.
      E.g. T=1000, steps=50: 999, 979, ..., 19.
    - ``"leading"``: ``k * (T // steps) + offset``; CompVis DDIM "uniform" is ``offset=1`` (1, 21, ..., 981 for
      50 steps). Its first step is ``T - T//steps + offset``, not ``T - 1``: sampling starts from noise that is
      too pure for that t, a known source of bias at few steps; kept for reproducing old results.
    - ``"linspace"``: ``round(linspace(0, T-1, steps))``: both ends, 999 ... 0. ``steps=1`` gives ``[T-1]``.

    ``offset`` applies to ``"leading"`` only. After the last listed timestep the samplers take one more step to
    clean data (``ab = 1``).
    """
    _check_num_timesteps(num_timesteps)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"steps must be in [1, {num_timesteps}] (the number of training timesteps), got {steps}"
        )
    if spacing == "trailing":
        ratio = num_timesteps / steps
        ts = torch.round(num_timesteps - torch.arange(steps, dtype=torch.float64) * ratio) - 1
    elif spacing == "leading":
        ts = (torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps)).flip(0) + offset
        if ts[0] >= num_timesteps or ts[-1] < 0:
            raise ValueError(
                f"spacing='leading' with steps={steps} and offset={offset} gives timesteps "
                f"{int(ts[-1])}..{int(ts[0])}, outside [0, {num_timesteps}); use a smaller offset or fewer steps"
            )
    elif spacing == "linspace":
        if steps == 1:
            ts = torch.tensor([num_timesteps - 1.0], dtype=torch.float64)
        else:
            ts = torch.round(torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64)).flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}")
    if spacing != "leading" and offset:
        raise ValueError(f"offset={offset} is only used with spacing='leading', not {spacing!r}")
    ts = ts.to(torch.int64)
    check_timesteps(ts, num_timesteps)
    return ts


def check_timesteps(timesteps: Tensor, num_timesteps: int) -> None:
    """Raise if ``timesteps`` is not a strictly decreasing 1-D integer sequence inside ``[0, num_timesteps)``."""
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(timesteps.shape)}")
    if timesteps.dtype.is_floating_point:
        raise ValueError("timesteps must be integers (indices into alphas_cumprod)")
    lo, hi = int(timesteps.min()), int(timesteps.max())
    if lo < 0 or hi >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps}), got values in [{lo}, {hi}]")
    if timesteps.numel() > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing (noisiest first), got {timesteps.tolist()}")


def _check_num_timesteps(num_timesteps: int) -> None:
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
