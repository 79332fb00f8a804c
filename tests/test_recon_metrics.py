"""PSNR/SSIM on hand-checkable cases, and SSIM unaffected by bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.metrics.image_quality import psnr, ssim


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 8, 8) - 1.0  # 0 in [0, 1]
    y = x + 0.2  # 0.1 in [0, 1] -> mse 0.01 -> 20 dB
    assert psnr(x, y).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(x, x).min() > 90


def test_ssim_identity_and_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    ref = ssim(x, y)
    assert 0.3 < ref.min() < 0.99
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ssim(x, y)
    torch.testing.assert_close(under_autocast, ref)
    assert not math.isnan(float(ref.mean()))
