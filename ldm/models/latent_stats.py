"""Latent statistics of a frozen autoencoder, and the normalisation of latents for stage 2 they define.

Rombach et al. 2022, Sec. 4.3.2 / App. G: latents are rescaled by a component-wise factor 1/σ estimated on the
first batch (Stable Diffusion's 0.18215 for its KL-f8). We estimate over a configurable number of images and
keep both the global statistics (``shift``, ``scale`` = 1/σ) and per-channel mean/std; stage 2 picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.models.distributions import DiagonalGaussianDistribution

NORM_MODES = ("scale", "channel")


@torch.no_grad()
def latent_statistics(
    encode: Callable[[Tensor], DiagonalGaussianDistribution],
    batches: Iterable[Tensor],
    n_images: int,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Statistics of posterior *samples* over up to ``n_images`` images.

    Args:
        encode: ``[B,3,H,W]`` in [-1,1] -> posterior over ``[B,C,h,w]`` latents.
        batches: image batches (already on the encoder's device).
        n_images: stop after this many images (fewer if ``batches`` runs out).
    Returns:
        ``{"scale": 1/σ, "shift": μ, "mean": [C], "std": [C], "n_images": int}`` (plain Python numbers).
    """
    total = sq = count = None
    seen = 0
    for images in batches:
        images = images[: n_images - seen]
        z = encode(images).sample(generator=generator).double()
        # per-channel sums over batch and space, in float64 so that large counts don't lose precision
        s, s2 = z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))
        n = z.shape[0] * z.shape[2] * z.shape[3]
        total, sq = (s, s2) if total is None else (total + s, sq + s2)
        count = n if count is None else count + n
        seen += images.shape[0]
        if seen >= n_images:
            break
    if not seen:
        raise ValueError("latent_statistics got no images: the training data loader is empty")
    if not bool(torch.isfinite(total).all() and torch.isfinite(sq).all()):
        # never written: stage 2 would silently train on NaN latents
        raise ValueError(f"the latents of {seen} images hold NaN/inf (per-channel sums {total.tolist()}): the "
                         "autoencoder's weights are broken; use an earlier checkpoint of the run")
    mean = total / count
    var = (sq / count - mean.pow(2)).clamp_min(1e-12)
    g_mean = total.sum() / (count * mean.numel())
    g_var = (sq.sum() / (count * mean.numel()) - g_mean.pow(2)).clamp_min(1e-12)
    return {
        "scale": float(1.0 / g_var.sqrt()),
        "shift": float(g_mean),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in var.sqrt()],
        "n_images": int(seen),
    }


# ------------------------------------------------------------------------------------------ normalisation

def _norm_params(z: Tensor, stats: Mapping[str, Any], mode: str) -> tuple[Tensor | float, Tensor | float]:
    """(offset, multiplier) so that normalised = (z - offset) * multiplier."""
    if mode == "scale":
        return float(stats["shift"]), float(stats["scale"])
    if mode == "channel":
        mean = torch.as_tensor(stats["mean"], dtype=z.dtype, device=z.device)
        std = torch.as_tensor(stats["std"], dtype=z.dtype, device=z.device)
        if z.ndim < 3 or z.shape[-3] != mean.numel():
            raise ValueError(f"latents {tuple(z.shape)} do not have {mean.numel()} channels at dim -3, as the "
                             "latent statistics do")
        return mean.view(-1, 1, 1), 1.0 / std.view(-1, 1, 1)
    raise ValueError(f"latent normalisation mode {mode!r} is not supported; choose one of {list(NORM_MODES)}")


def normalize_latents(z: Tensor, stats: Mapping[str, Any], mode: str = "scale") -> Tensor:
    """Autoencoder latents -> the roughly unit-variance space diffusion runs in.

    ``z``: [..., C, h, w]; ``stats``: ``ldm.models.latent_stats.latent_statistics`` output.
    ``"scale"``: (z - shift) * scale, the paper's global 1/sigma rescaling (Rombach et al. 2022, Sec. 4.3.2);
    ``"channel"``: (z - mean_c) / std_c per channel (EDM2).
    """
    offset, mult = _norm_params(z, stats, mode)
    return (z - offset) * mult


def denormalize_latents(z: Tensor, stats: Mapping[str, Any], mode: str = "scale") -> Tensor:
    """Inverse of ``normalize_latents`` (diffusion space -> latents the decoder takes)."""
    offset, mult = _norm_params(z, stats, mode)
    return z / mult + offset


# Under latent_norm=scale, channels whose std differs from the largest by more than this factor end up
# almost constant next to the noise: the U-Net sees mostly the widest channel.
CHANNEL_SPREAD_LIMIT = 10.0


def channel_spread_problem(stats: Mapping[str, Any], mode: str) -> str | None:
    """A warning text when ``mode == "scale"`` and the per-channel latent stds differ by more than
    ``CHANNEL_SPREAD_LIMIT`` (an autoencoder whose KL term let one channel grow), else None."""
    std = [float(s) for s in stats.get("std") or []]
    if mode != "scale" or not std or min(std) <= 0:
        return None
    ratio = max(std) / min(std)
    if ratio <= CHANNEL_SPREAD_LIMIT:
        return None
    return (f"the autoencoder's latent channels have stds {[round(s, 3) for s in std]} ({ratio:.0f}x apart): "
            f"latent_norm=scale divides all by one sigma, leaving the narrow channels nearly constant under "
            f"the noise. latent_norm=channel normalises each channel (EDM2); consider it, or a stage-1 run "
            f"with a larger loss.kl_weight")
