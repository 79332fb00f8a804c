"""Diagonal Gaussian posterior q(z|x) of the KL-regularised autoencoder.

The LDM first stage (Rombach et al. 2022, Sec. 3.1) regularises its latent with a small KL penalty towards
N(0, I), as in a VAE (Kingma & Welling 2014). The encoder predicts per-pixel mean and log-variance; this
class holds them and provides sampling (reparameterisation trick), the mode, KL and negative log-likelihood.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Keeps exp(logvar) finite in float32 and bf16 (exp(20) ~ 4.9e8, exp(-30) ~ 9.4e-14) so that an untrained
# or diverging encoder cannot produce inf/NaN variances.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def _draw(mean: Tensor, std: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is not None and generator.device.type != mean.device.type:
        raise ValueError(f"generator is on {generator.device} but the latents are on {mean.device}; "
                         f"create it with torch.Generator(device={str(mean.device)!r})")
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


def sample_posterior(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): a draw from the diagonal Gaussian q(z|x) given by its
    (cached) moments, exactly as ``DiagonalGaussianDistribution.sample`` draws it (logvar clamped alike).

    ``mean``, ``logvar``: [..., C, h, w] float (same shape). ``generator`` must be on the tensors' device.
    Returns z of the shape and dtype of ``mean``.
    """
    if mean.shape != logvar.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    return _draw(mean, torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)), generator)


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) over latents of shape ``[B, C, h, w]``.

    Args:
        moments: ``[B, 2C, h, w]``; the first C channels are the mean, the last C the log-variance.
        deterministic: if True the distribution collapses onto its mean (std = var = 0); sampling returns
            the mean and KL / NLL are zero. Useful for evaluating an autoencoder without posterior noise.
    """

    def __init__(self, moments: Tensor, deterministic: bool = False) -> None:
        if moments.ndim < 2 or moments.shape[1] % 2 != 0:
            raise ValueError(
                f"moments must have an even number of channels on dim 1 (mean and log-variance stacked), "
                f"got shape {tuple(moments.shape)}"
            )
        self.moments = moments
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @classmethod
    def point_mass(cls, mean: Tensor) -> DiagonalGaussianDistribution:
        """All mass on ``mean``: the "posterior" of a deterministic encoder (VQ's pre-quantisation latent). Its
        log-variance is ``LOGVAR_MIN``, so moments cached from it sample ``mean`` (noise std exp(-15) ~ 3e-7)."""
        return cls(torch.cat([mean, torch.full_like(mean, LOGVAR_MIN)], dim=1), deterministic=True)

    def _sum_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample z = mean + std * eps, eps ~ N(0, I). Returns ``[B, C, h, w]``.

        ``generator`` (optional) must live on the same device type as the latents; it makes the noise
        reproducible. Noise is drawn in the latents' dtype.
        """
        return _draw(self.mean, self.std, generator)

    def mode(self) -> Tensor:
        """The most likely latent, i.e. the mean. ``[B, C, h, w]``."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) summed over all non-batch dims, shape ``[B]``, float32, >= 0.

        With ``other=None`` the reference is N(0, I): 0.5 * sum(mean^2 + var - 1 - logvar), the closed form
        of the VAE regulariser (Kingma & Welling 2014, App. B). Computed in float32 because summing ~1e4
        terms in bf16 loses most of the precision.
        """
        batch = self.mean.shape[0]
        if self.deterministic:
            return torch.zeros(batch, device=self.mean.device, dtype=torch.float32)
        mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
        if other is None:
            terms = mean.pow(2) + var - 1.0 - logvar
        else:
            if other.mean.shape != self.mean.shape:
                raise ValueError(
                    f"cannot compare distributions of shapes {tuple(self.mean.shape)} and "
                    f"{tuple(other.mean.shape)}"
                )
            if other.deterministic:
                raise ValueError("KL to a deterministic (zero-variance) distribution is undefined")
            o_mean, o_var, o_logvar = other.mean.float(), other.var.float(), other.logvar.float()
            terms = (mean - o_mean).pow(2) / o_var + var / o_var - 1.0 - logvar + o_logvar
        return 0.5 * terms.sum(dim=self._sum_dims())

    def nll(self, x: Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of ``x`` (same shape as the mean) summed over ``dims``; float32.

        0.5 * sum(log(2 pi) + logvar + (x - mean)^2 / var). Zero for a deterministic distribution.
        """
        if x.shape != self.mean.shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected {tuple(self.mean.shape)}")
        if self.deterministic:
            reduced = [s for i, s in enumerate(x.shape) if i not in {d % x.ndim for d in dims}]
            return torch.zeros(reduced, device=x.device, dtype=torch.float32)
        logvar, var = self.logvar.float(), self.var.float()
        terms = math.log(2.0 * math.pi) + logvar + (x.float() - self.mean.float()).pow(2) / var
        return 0.5 * terms.sum(dim=dims)

    def __repr__(self) -> str:
        return (
            f"DiagonalGaussianDistribution(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype}, "
            f"deterministic={self.deterministic})"
        )
