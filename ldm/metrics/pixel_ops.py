"""Pixel operations on 2-D numpy maps for the shape detector (``ldm.metrics.alignment``): connected regions,
binary dilation and a separable Gaussian blur, in plain numpy (no scipy).
"""

from __future__ import annotations

import functools
import math

import numpy as np


def _neighbourhood(x: np.ndarray, op, fill) -> np.ndarray:
    """``op`` (np.minimum, np.logical_or) over each pixel's 3 x 3 neighbourhood, ``fill`` outside the image."""
    h, w = x.shape
    p = np.pad(x, 1, constant_values=fill)
    out = x.copy()
    for dy in range(3):
        for dx in range(3):
            op(out, p[dy:dy + h, dx:dx + w], out=out)
    return out


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of ``mask``: labels [H, W] (0 = background, 1..n) and n.

    Min-label propagation with pointer jumping (each pixel points to a pixel of its component with a
    smaller index), so it converges in a few sweeps even for long shapes.
    """
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = np.where(mask, _neighbourhood(lab, np.minimum, big), big)
        flat = new.ravel()
        fg = flat < big
        for _ in range(4):
            flat[fg] = flat[flat[fg]]
        if np.array_equal(new, lab):
            break
        lab = new
    uniq = np.unique(lab[mask])
    return np.where(mask, np.searchsorted(uniq, lab) + 1, 0), len(uniq)


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by ``steps`` pixels (3 x 3 square)."""
    for _ in range(steps):
        mask = _neighbourhood(mask, np.logical_or, False)
    return mask


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur operator along one axis (zero outside the window)."""
    i = np.arange(n, dtype=np.float32)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return (g / (sigma * math.sqrt(2 * math.pi))).astype(np.float32)


def blur(t: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D map [h, w]."""
    return _blur_matrix(t.shape[0], sigma) @ t @ _blur_matrix(t.shape[1], sigma)
