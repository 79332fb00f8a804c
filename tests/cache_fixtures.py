"""Shared by the latent-cache tests (test_cache_build.py, test_cache_readers.py): a small cache of `shapes`
built from the session's stage-1 checkpoint, and that checkpoint's autoencoder."""

from __future__ import annotations

import pytest
from stage2_fixtures import shapes_data_module

from ldm.cache import build_cache
from ldm.checkpoint import build_autoencoder

TRAIN, VAL, SHARD, BATCH = 10, 4, 4, 2  # images per split / shard / encoder batch: train shards of 4, 4, 2


def _cache(ckpt, out, **kw):
    data = shapes_data_module(size=kw.pop("size", TRAIN), val_size=kw.pop("val_size", VAL), batch_size=BATCH)
    kw.setdefault("shard_size", SHARD)
    return build_cache(ckpt, data, out, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def model(stage1_ckpt):
    return build_autoencoder(stage1_ckpt)


@pytest.fixture(scope="module")
def cache16(stage1_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache16")
    return out, _cache(stage1_ckpt, out)
