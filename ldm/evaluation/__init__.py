"""Evaluation of trained models (used by ``evaluate.py``; plain torch, no Hydra or Lightning).

- ``reconstruction.evaluate_reconstruction``: stage 1 -- PSNR / SSIM / LPIPS (mean ± std) and rFID of reconstructions.
- ``generation.evaluate_generation``: stage 2 -- generate from a split's captions (resumable, on every rank),
  FID / KID / IS against cached reference statistics, text alignment for ``shapes``.
- ``imagesets.evaluate_image_sets``: FID / KID between two folders or sets of webdataset shards.
- ``distributed``: rank slices and gathering (torchrun), a no-op in a single process.
"""

from ldm.evaluation.generation import evaluate_generation
from ldm.evaluation.imagesets import evaluate_image_sets
from ldm.evaluation.reconstruction import evaluate_reconstruction

__all__ = ["evaluate_generation", "evaluate_image_sets", "evaluate_reconstruction"]
