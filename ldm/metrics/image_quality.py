"""Per-image reconstruction metrics on images in [-1, 1] (evaluated on [0, 1], as the paper's Table 8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped, float32."""
    return ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB per image, ``[B]``, for ``[B,C,H,W]`` images in [-1, 1] (peak 1 after mapping to [0, 1])."""
    mse = (to_unit(x) - to_unit(y)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """SSIM per image, ``[B]`` (Gaussian window 11, sigma 1.5, data range 1).

    Always in float32 with autocast off: SSIM's variances are differences of means of squares, which bf16
    autocast (its Gaussian filter is a convolution) turns into noise, even negative SSIM.
    """
    with torch.autocast(x.device.type, enabled=False):
        return structural_similarity_index_measure(to_unit(x), to_unit(y), data_range=1.0, reduction="none")


def mean_std(values: Tensor | Sequence[float]) -> dict[str, float]:
    """``{"mean", "std"}`` of per-image values (population std, ddof = 0), as the paper's Table 8 reports
    PSNR / SSIM / LPIPS: mean ± standard deviation over the evaluated images."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_std needs at least one value")
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False))}
