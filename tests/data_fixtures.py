"""Shared by the ldm.data tests (test_data_builtin.py, test_data_folders.py, test_data_shards.py): the check of
a sample's image tensor, the repository root, and a folder of 40 `shapes` images written as 4 shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ldm.data.shapes import ShapesDataset
from ldm.data.shard_writer import write_shards

REPO = Path(__file__).resolve().parents[1]


def check_image(x: torch.Tensor, resolution: int) -> None:
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, resolution, resolution)
    assert x.min() >= -1.0 and x.max() <= 1.0


@pytest.fixture
def shapes_shards(tmp_path) -> tuple[Path, ShapesDataset]:
    ds = ShapesDataset(size=40, resolution=16)
    written = write_shards((ds[i] for i in range(len(ds))), str(tmp_path / "s" / "shard-%06d.tar"), maxcount=10)
    assert [Path(p).name for p in written] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert sorted(os.listdir(tmp_path / "s")) == [f"shard-{i:06d}.tar" for i in range(4)]
    return tmp_path / "s", ds
