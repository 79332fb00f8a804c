"""Shared by the diffusion-core tests (test_diffusion_training.py, test_diffusion_sampling.py)."""

from __future__ import annotations

import pytest
import torch

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Everything here works on tensors of <= 80k elements in loops of up to 250 steps, where intra-op
    threading costs more than it gains (3x slower with 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
