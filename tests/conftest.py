from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")

# Tests run on small CPUs: keep intra-op threads modest so parallel workers don't oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stage1_ckpt(tmp_path_factory) -> Path:
    """A real stage-1 checkpoint of the tiny autoencoder at 32 px (tests/stage2_fixtures.py), made once per session."""
    from stage2_fixtures import make_stage1_checkpoint

    return make_stage1_checkpoint(tmp_path_factory.mktemp("stage1") / "last.ckpt", resolution=32)


@pytest.fixture(scope="session")
def stage2_ckpt(stage1_ckpt, tmp_path_factory) -> Path:
    """A stage-2 checkpoint (tiny U-Net + text transformer at random init, the stage-1 autoencoder above)."""
    from stage2_fixtures import make_stage2_checkpoint

    return make_stage2_checkpoint(tmp_path_factory.mktemp("stage2") / "last.ckpt", stage1_ckpt)


@pytest.fixture(scope="session")
def stage2_ema(stage1_ckpt, tmp_path_factory) -> Path:
    """A stage-2 checkpoint whose EMA weights differ from the raw ones by 0.01 (export and interop tests)."""
    from stage2_fixtures import make_stage2_checkpoint

    return make_stage2_checkpoint(tmp_path_factory.mktemp("s2ema") / "last.ckpt", stage1_ckpt, ema_offset=0.01)
