"""Shared by the condition-encoder tests (test_text_transformer.py, test_text_pretrained.py)."""

from __future__ import annotations

import torch


def _check_output(context, mask, batch: int, length: int, dim: int) -> None:
    assert context.shape == (batch, length, dim) and context.dtype == torch.float32
    assert mask.shape == (batch, length) and mask.dtype == torch.bool
    assert mask.any(dim=1).all() and torch.isfinite(context).all()
