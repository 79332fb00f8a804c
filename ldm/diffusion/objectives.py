"""What the network predicts (eps, v or x0), conversions between them, and loss weights (pure functions).

With ``a = sqrt(ab_t)`` and ``s = sqrt(1 - ab_t)`` the forward process is ``x_t = a*x0 + s*eps``. The three
parameterisations of the network output are
- ``"eps"``: the noise (Ho et al. 2020, Eq. 14; the LDM paper's choice),
- ``"v"``:   ``v = a*eps - s*x0`` (Salimans & Ho 2022, Sec. 4 and App. D),
- ``"x0"``:  the clean sample.
For a fixed ``(x_t, t)`` each is an affine function of any other, which is why classifier-free guidance can be
applied to the raw output whatever the objective (see ``guidance.py``).

``alpha_bar`` arguments are ``ab_t`` per sample: a tensor of shape [B] (reshaped to broadcast over the
remaining dimensions of ``x``), a 0-d tensor, or a tensor already broadcastable to ``x``. Conversions are done
in at least float32 (a bf16 network output under autocast is promoted).
"""

from __future__ import annotations

import torch
from torch import Tensor

OBJECTIVES = ("eps", "v", "x0")
WEIGHTINGS = ("uniform", "min_snr")


def check_objective(objective: str) -> None:
    """Raise a ValueError naming the choices if ``objective`` is not one of ``"eps" | "v" | "x0"``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown prediction objective {objective!r}; choose one of {list(OBJECTIVES)}")


def _coefs(alpha_bar: Tensor, like: Tensor, *others: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, s) = (sqrt(ab), sqrt(1-ab))`` in the computation dtype, shaped to broadcast against ``like``."""
    dtype = torch.promote_types(torch.float32, like.dtype)
    for o in others:
        dtype = torch.promote_types(dtype, o.dtype)
    ab = torch.as_tensor(alpha_bar).to(device=like.device, dtype=torch.float64)
    if ab.ndim == 1 and like.ndim > 1 and ab.shape[0] == like.shape[0]:
        ab = ab.reshape(-1, *([1] * (like.ndim - 1)))
    # sqrt in float64 first: 1 - ab is ~1e-3 near t = 0 and would lose digits in fp32 subtraction
    return ab.sqrt().to(dtype), (1 - ab).sqrt().to(dtype)


def q_sample(x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward process ``x_t = sqrt(ab)*x0 + sqrt(1-ab)*noise`` (Ho et al. 2020, Eq. 4). Shapes [B, ...]."""
    a, s = _coefs(alpha_bar, x0, noise)
    return a * x0 + s * noise


# (a, s, first, second) -> value, per objective: what the network regresses onto (first = x0, second = eps) and how
# its output maps back to x0 and eps (first = x_t, second = the output); each is the affine map its docstring gives
_TARGET = {"eps": lambda a, s, x0, eps: eps.to(a.dtype), "v": lambda a, s, x0, eps: a * eps - s * x0,
           "x0": lambda a, s, x0, eps: x0.to(a.dtype)}
_TO_X0 = {"eps": lambda a, s, x_t, out: (x_t - s * out) / a, "v": lambda a, s, x_t, out: a * x_t - s * out,
          "x0": lambda a, s, x_t, out: out.to(a.dtype)}
_TO_EPS = {"eps": lambda a, s, x_t, out: out.to(a.dtype), "v": lambda a, s, x_t, out: s * x_t + a * out,
           "x0": lambda a, s, x_t, out: (x_t - a * out) / s}


def training_target(objective: str, x0: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Regression target of the network for ``x_t = q_sample(x0, noise, ab)``: eps, v or x0. Shape of ``x0``."""
    check_objective(objective)
    return _TARGET[objective](*_coefs(alpha_bar, x0, noise), x0, noise)


def to_x0(objective: str, x_t: Tensor, model_out: Tensor, alpha_bar: Tensor) -> Tensor:
    """Clean-sample estimate from the raw output: ``(x_t - s*eps)/a``, ``a*x_t - s*v`` or the output itself."""
    check_objective(objective)
    return _TO_X0[objective](*_coefs(alpha_bar, x_t, model_out), x_t, model_out)


def to_eps(objective: str, x_t: Tensor, model_out: Tensor, alpha_bar: Tensor) -> Tensor:
    """Noise estimate from the raw output: the output itself, ``s*x_t + a*v`` or ``(x_t - a*x0)/s``."""
    check_objective(objective)
    return _TO_EPS[objective](*_coefs(alpha_bar, x_t, model_out), x_t, model_out)


def to_v(objective: str, x_t: Tensor, model_out: Tensor, alpha_bar: Tensor) -> Tensor:
    """Velocity estimate ``a*eps - s*x0`` from the raw output of any objective."""
    check_objective(objective)
    if objective == "v":
        return model_out.to(torch.promote_types(torch.float32, model_out.dtype))
    a, s = _coefs(alpha_bar, x_t, model_out)
    eps = to_eps(objective, x_t, model_out, alpha_bar)
    x0 = to_x0(objective, x_t, model_out, alpha_bar)
    return a * eps - s * x0


def loss_weight(objective: str, snr: Tensor, weighting: str = "uniform", gamma: float = 5.0) -> Tensor:
    """Per-sample weight of the MSE on the raw output, same shape as ``snr`` ([B]).

    ``"uniform"``: 1 (Ho et al. 2020's simplified loss). ``"min_snr"`` (Hang et al. 2023, Eq. 9/Sec. 3.4): the
    weight that makes the loss equal ``min(snr, gamma) * ||x0 - x0_hat||^2``. Since ``x0 - x0_hat =
    -(s/a) (eps - eps_hat) = -s (v - v_hat)`` for fixed ``x_t`` (and ``s^2 = 1/(snr + 1)``):
    eps: ``min(snr, gamma) / snr``;  v: ``min(snr, gamma) / (snr + 1)``;  x0: ``min(snr, gamma)``.
    """
    check_objective(objective)
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if objective == "eps":
        return clipped / snr
    if objective == "v":
        return clipped / (snr + 1)
    return clipped


def sample_noise(x0: Tensor, generator: torch.Generator | None = None, offset: float = 0.0) -> Tensor:
    """Training noise like ``x0`` (float32 or wider), optionally with offset noise (Guttenberg 2023).

    Offset noise adds ``offset * N(0, 1)`` drawn once per sample and channel (dims 0 and 1 of ``x0``, constant
    over the spatial dims), so the model also learns to change the mean of each channel, which plain
    per-pixel noise almost never perturbs at high SNR (images that are very dark or bright overall).
    Draws on the generator's device, then moves to ``x0.device``, so a CPU generator is reproducible anywhere.
    """
    dtype = torch.promote_types(torch.float32, x0.dtype)
    noise = randn(x0.shape, generator, x0.device, dtype)
    if offset:
        shape = tuple(x0.shape[:2]) + (1,) * max(x0.ndim - 2, 0)
        noise = noise + offset * randn(shape, generator, x0.device, dtype)
    return noise


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Standard normal draws from ``generator`` (global RNG if None) on the generator's device, moved to
    ``device``; the same seed gives the same numbers whichever device the result lives on."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
