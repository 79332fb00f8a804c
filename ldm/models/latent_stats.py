"""Latent statistics of a frozen autoencoder, used to normalise latents for stage 2.

Rombach et al. 2022, Sec. 4.3.2 / App. G: latents are rescaled by a component-wise factor 1/σ estimated on the
first batch (Stable Diffusion's 0.18215 for its KL-f8). We estimate over a configurable number of images and
keep both the global statistics (``shift``, ``scale`` = 1/σ) and per-channel mean/std; stage 2 picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ldm.models.distributions import DiagonalGaussianDistribution


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
