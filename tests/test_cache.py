"""Latent cache: shards and manifest, exactness against the autoencoder, resume, two ranks, errors, readers."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from stage2_fixtures import make_stage1_checkpoint, shapes_batch, shapes_data_module
from torch import nn

import ldm.cache
from ldm.cache import build_cache
from ldm.checkpoint import build_autoencoder, load_checkpoint
from ldm.data.datamodules import ImageDataModule
from ldm.data.latent_format import autoencoder_identity, check_cache_compatible, read_manifest
from ldm.data.latents import LatentDataModule, LatentMemoryDataset, LatentShardDataset
from ldm.data.shapes import ShapesDataset
from ldm.data.shards import WebDatasetImages, write_shards
from ldm.models.distributions import sample_posterior
from ldm.models.latent_stats import channel_spread_problem, denormalize_latents, normalize_latents
from ldm.pipeline import training_condition

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
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


def _by_key(ds) -> dict[str, dict]:
    return {s["key"]: s for s in ds}


def _encode(model, images: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """Posterior means in the cache's own batches (never crossing a shard: SHARD is a multiple of BATCH)."""
    with torch.no_grad():
        return torch.cat([model.encode(images[i:i + batch]).mean for i in range(0, len(images), batch)])


# ----------------------------------------------------------------------------------- exactness

def test_cached_means_decode_like_the_autoencoder(cache16, model):
    out, _ = cache16
    ae, _ = model
    images = shapes_batch(VAL, 32, split="val")
    cached = _by_key(LatentMemoryDataset(out, "val"))
    mean16 = torch.stack([cached[f"shapes/val/{i:07d}"]["mean"] for i in range(VAL)])
    assert mean16.dtype == torch.float32
    mean = _encode(ae, images)
    # float16 rounds to nearest with an 11-bit significand: |error| <= 2^-11 |x| (2^-25 absolute below 2^-14)
    err = (mean16 - mean).abs()
    assert bool((err <= mean.abs() * 2**-11 + 2**-25).all()) and err.max() > 0
    with torch.no_grad():
        recon = ae.decode(mean)  # decode(mode): the autoencoder's own reconstruction
        from_cache = ae.decode(mean16)
    # a relative 5e-4 perturbation of the latent moves the decoded pixels (range [-1, 1]) by a few 1e-4
    assert (from_cache - recon).abs().max() < 5e-3
    logvar = torch.stack([cached[f"shapes/val/{i:07d}"]["logvar"] for i in range(VAL)])
    with torch.no_grad():
        ref_logvar = torch.cat([ae.encode(images[i:i + BATCH]).logvar for i in range(0, VAL, BATCH)])
    assert torch.allclose(logvar, ref_logvar, rtol=2**-11, atol=2**-25)


def test_float32_cache_is_exact(stage1_ckpt, model, tmp_path):
    ae, _ = model
    _cache(stage1_ckpt, tmp_path, dtype="float32", splits=["val"])
    cached = _by_key(LatentMemoryDataset(tmp_path, "val"))
    mean = torch.stack([cached[f"shapes/val/{i:07d}"]["mean"] for i in range(VAL)])
    ref = _encode(ae, shapes_batch(VAL, 32, split="val"))
    assert torch.equal(mean, ref)
    with torch.no_grad():
        assert torch.equal(ae.decode(mean), ae.decode(ref))
    # bf16 autocast + channels_last: the same latents up to bf16's 8-bit significand (rounding per layer)
    _cache(stage1_ckpt, tmp_path / "bf16", dtype="float32", splits=["val"], precision="bf16", channels_last=True)
    cached = _by_key(LatentMemoryDataset(tmp_path / "bf16", "val"))
    fast = torch.stack([cached[f"shapes/val/{i:07d}"]["mean"] for i in range(VAL)])
    assert not torch.equal(fast, ref) and (fast - ref).abs().max() < 0.05 * ref.abs().max()


# ------------------------------------------------------------------------------ manifest & shards

def test_manifest_and_shards(cache16, stage1_ckpt, model):
    out, manifest = cache16
    ae, stats = model
    assert read_manifest(out) == manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ldm-latent-cache" and manifest["version"] == 1
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["dtype"] == "float16" and manifest["resolution"] == 32
    assert manifest["autoencoder"]["identity"] == autoencoder_identity(ae)
    assert manifest["autoencoder"]["ckpt_path"] == str(Path(stage1_ckpt).resolve())
    assert manifest["latent_stats"] == stats == load_checkpoint(stage1_ckpt)["ldm"]["latent_stats"]
    assert manifest["text_encoder"] is None and "ShapesDataset" in manifest["dataset"]
    assert time.time() - time.mktime(time.strptime(manifest["created"][:19], "%Y-%m-%dT%H:%M:%S")) < 86400 * 2
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["num_samples"] == TRAIN and val["num_samples"] == VAL
    assert [s["num_samples"] for s in train["shards"]] == [4, 4, 2] and [s["num_samples"] for s in val["shards"]] == [4]
    assert [s["name"] for s in train["shards"]] == [f"train/shard-{i:06d}.tar" for i in range(3)]
    for shard in train["shards"] + val["shards"]:
        path = out / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        side = json.loads(path.with_suffix(".json").read_text())
        assert side["num_samples"] == shard["num_samples"] and side["settings"]["autoencoder"] == autoencoder_identity(ae)
    assert not list(out.rglob("*.tmp-*"))


def test_captions_attributes_and_keys_round_trip(cache16):
    out, _ = cache16
    for split, n in (("train", TRAIN), ("val", VAL)):
        source = ShapesDataset(split=split, size=TRAIN, val_size=VAL, resolution=32)
        cached = _by_key(LatentMemoryDataset(out, split))
        assert len(cached) == n
        for i in range(n):
            ref = source[i]
            got = cached[ref["key"]]
            assert got["caption"] == ref["caption"] and got["attributes"] == ref["attributes"]
            assert json.loads(got["attributes"])["shapes"]  # JSON text, as the image datasets yield
            assert "label" not in got


# ------------------------------------------------------------------------------ sampling & norm

def test_sample_posterior_statistics():
    mean = torch.tensor([[-1.5, 0.0], [0.3, 4.0]]).view(1, 1, 2, 2).expand(20000, 1, 2, 2)
    logvar = torch.tensor([[0.0, -2.0], [1.0, -6.0]]).view(1, 1, 2, 2).expand(20000, 1, 2, 2)
    z = sample_posterior(mean, logvar, generator=torch.Generator().manual_seed(0))
    std = torch.exp(0.5 * logvar[0])
    # 20,000 draws: the sample mean is within 5 standard errors (std / sqrt(n)), the std within 5%
    assert ((z.mean(0) - mean[0]).abs() < 5 * std / 20000**0.5).all()
    assert torch.allclose(z.std(0), std, rtol=0.05)
    again = sample_posterior(mean, logvar, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    with pytest.raises(ValueError, match="same shape"):
        sample_posterior(mean, logvar[:1])


def test_normalize_round_trip_both_modes():
    stats = {"scale": 0.5, "shift": 0.2, "mean": [1.0, -2.0, 0.5], "std": [2.0, 0.5, 4.0]}
    z = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert torch.allclose(normalize_latents(z, stats, "scale"), (z - 0.2) * 0.5)
    per_channel = normalize_latents(z, stats, "channel")
    assert torch.allclose(per_channel[:, 1], (z[:, 1] + 2.0) / 0.5)
    for mode in ("scale", "channel"):
        assert torch.allclose(denormalize_latents(normalize_latents(z, stats, mode), stats, mode), z, atol=1e-5)
        single = z[0]  # [C, h, w] works too
        assert torch.allclose(normalize_latents(single, stats, mode), normalize_latents(z, stats, mode)[0])
    # per-channel statistics of data drawn with those statistics are normalised to ~N(0, 1)
    data = torch.randn(4000, 3, 2, 2) * torch.tensor(stats["std"]).view(3, 1, 1) + torch.tensor(stats["mean"]).view(3, 1, 1)
    n = normalize_latents(data, stats, "channel")
    assert torch.allclose(n.mean((0, 2, 3)), torch.zeros(3), atol=0.05)
    assert torch.allclose(n.std((0, 2, 3)), torch.ones(3), atol=0.05)
    with pytest.raises(ValueError, match="choose one of"):
        normalize_latents(z, stats, "global")
    with pytest.raises(ValueError, match="3 channels"):
        normalize_latents(torch.zeros(2, 4, 2, 2), stats, "channel")


# ------------------------------------------------------------------------------------------ resume

def test_resume_after_interruption(stage1_ckpt, tmp_path, monkeypatch):
    real = ldm.cache._encode_batch
    calls = {"n": 0}

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # first batch of train shard 1: shard 0 is complete, shard 1 half-written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ldm.cache, "_encode_batch", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _cache(stage1_ckpt, tmp_path)
    monkeypatch.setattr(ldm.cache, "_encode_batch", real)
    train = tmp_path / "train"
    assert sorted(p.name for p in train.iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted: rerun the same command"):
        read_manifest(tmp_path)
    # what a killed process leaves: a temporary file, and a shard renamed just before its sidecar was written
    (train / "shard-000001.tar.tmp-99999").write_bytes(b"partial")
    (train / "shard-000002.tar").write_bytes(b"not a finished shard")
    first = (train / "shard-000000.tar").stat()

    manifest = _cache(stage1_ckpt, tmp_path)
    assert manifest["splits"]["train"]["num_samples"] == TRAIN and manifest["splits"]["val"]["num_samples"] == VAL
    kept = (train / "shard-000000.tar").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten
    assert not list(tmp_path.rglob("*.tmp-*"))
    assert len(LatentMemoryDataset(tmp_path, "train")) == TRAIN

    # a lost shard is rebuilt and nothing else is touched
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in train.glob("*.tar")}
    (train / "shard-000001.tar").unlink()
    done = []
    again = _cache(stage1_ckpt, tmp_path, on_shard_done=done.append)
    assert done == ["train/shard-000001.tar"]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in train.glob("*.tar")}
    assert {k: v for k, v in after.items() if k != "shard-000001.tar"} == \
        {k: v for k, v in before.items() if k != "shard-000001.tar"}
    assert again["splits"] == manifest["splits"]
    assert _by_key(LatentMemoryDataset(tmp_path, "train")).keys() == {f"shapes/train/{i:07d}" for i in range(TRAIN)}


# ----------------------------------------------------------------------------------------- errors

def test_checkpoint_errors(stage1_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        _cache(tmp_path / "nope.ckpt", tmp_path / "c")
    ckpt = load_checkpoint(stage1_ckpt)
    ckpt["ldm"] = dict(ckpt["ldm"], stage="ldm")
    with pytest.raises(ValueError, match="is a 'ldm' checkpoint; the latent cache needs a stage-1"):
        _cache(ckpt, tmp_path / "c")
    ckpt["ldm"] = dict(ckpt["ldm"], stage="autoencoder", latent_stats=None)
    with pytest.raises(ValueError, match="no latent statistics.*add_latent_stats"):
        _cache(ckpt, tmp_path / "c")
    with pytest.raises(ValueError, match="dtype='bfloat16' is not supported"):
        _cache(stage1_ckpt, tmp_path / "c", dtype="bfloat16")


def test_cache_of_another_autoencoder_is_refused_unless_overwrite(cache16, stage1_ckpt, tmp_path):
    out = tmp_path / "cache"
    _cache(stage1_ckpt, out, splits=["val"])
    other = make_stage1_checkpoint(tmp_path / "other.ckpt", seed=1)
    ours, theirs = (autoencoder_identity(build_autoencoder(p)[0]) for p in (stage1_ckpt, other))
    with pytest.raises(ValueError, match=f"(?s)other settings.*{ours}.*vs {theirs} now.*overwrite=true"):
        _cache(other, out, splits=["val"])
    manifest = _cache(other, out, splits=["val"], overwrite=True)
    assert manifest["autoencoder"]["identity"] == theirs and manifest["splits"]["val"]["num_samples"] == VAL


def test_check_cache_compatible_names_both_values(cache16, model):
    _, manifest = cache16
    ae, stats = model
    identity = autoencoder_identity(ae)
    check_cache_compatible(manifest, identity, [4, 8, 8], stats)  # the matching autoencoder passes
    with pytest.raises(ValueError, match=f"identity: cache {identity} .* vs configured abc123"):
        check_cache_compatible(manifest, "abc123")
    with pytest.raises(ValueError, match=r"latent shape: cache \[4, 8, 8\] \(images of 32 px\) vs configured \[4, 16, 16\]"):
        check_cache_compatible(manifest, identity, (4, 16, 16))
    with pytest.raises(ValueError, match=rf"scale: cache {stats['scale']} vs autoencoder 0.18215"):
        check_cache_compatible(manifest, identity, stats=dict(stats, scale=0.18215))


class FakeTextEncoder(nn.Module):
    """A deterministic stand-in for a frozen text encoder: one token per word (<= 5), D = 6."""

    context_dim, max_length, input_key = 6, 5, "caption"

    def __init__(self, trainable: bool = False) -> None:
        super().__init__()
        self.trainable = trainable
        self.proj = nn.Linear(1, 6)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(3))

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        words = [(c.split() + [""] * 5)[:5] for c in captions]
        ids = torch.tensor([[sum(map(ord, w)) % 97 / 97 for w in ws] for ws in words])
        mask = torch.tensor([[bool(w) for w in ws] for ws in words])
        mask[:, 0] = True
        return self.proj(ids.unsqueeze(-1)), mask

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def identity(self) -> dict:
        return {"name": "fake", "max_length": 5, "sha256": autoencoder_identity(self)}


def test_text_embeddings_cached_and_trainable_encoder_refused(stage1_ckpt, tmp_path):
    encoder = FakeTextEncoder()
    manifest = _cache(stage1_ckpt, tmp_path, splits=["val"], text_encoder=encoder, dtype="float32")
    assert manifest["text_encoder"] == {"identity": encoder.identity(), "context_shape": [5, 6]}
    assert {"context", "context_mask"} <= set(manifest["fields"])
    batch = next(iter(LatentDataModule(tmp_path, batch_size=VAL, num_workers=0, in_memory=True).val_dataloader()))
    with torch.no_grad():
        context, mask = encoder(batch["caption"])
    assert torch.equal(batch["context"], context) and torch.equal(batch["context_mask"], mask)
    assert batch["context_mask"].dtype == torch.bool
    check_cache_compatible(manifest, text_encoder=encoder)
    with pytest.raises(ValueError, match="text encoder: cache"):
        check_cache_compatible(manifest, text_encoder={"name": "minilm"})
    check_cache_compatible(manifest, text_encoder=FakeTextEncoder(trainable=True))  # trainable: not compared
    with pytest.raises(ValueError, match="is trainable.*cannot be cached"):
        _cache(stage1_ckpt, tmp_path / "t", text_encoder=FakeTextEncoder(trainable=True))


def test_training_condition_uses_cached_embeddings_only_for_a_frozen_encoder():
    captions = ["a red circle", "a small blue square on the left", "a star"]
    cached = torch.full((3, 5, 6), 7.0)  # not what the encoder computes: tells the two paths apart
    batch = {"caption": captions, "context": cached, "context_mask": torch.ones(3, 5, dtype=torch.bool)}
    keep = torch.tensor([True, False, True])
    frozen, trainable = FakeTextEncoder(), FakeTextEncoder(trainable=True)
    with torch.no_grad():
        null, null_mask = frozen([""])
        cond = training_condition(frozen, batch, torch.ones(3, dtype=torch.bool))
        assert torch.equal(cond["context"], cached)
        cond = training_condition(frozen, batch, keep)  # CFG dropout: row 1 becomes the null condition
        assert torch.equal(cond["context"][[0, 2]], cached[[0, 2]])
        assert torch.equal(cond["context"][1], null[0]) and torch.equal(cond["context_mask"][1], null_mask[0])
        # a trainable encoder learns from the captions: the cached embeddings are never used
        cond = training_condition(trainable, batch, keep)
        want, want_mask = trainable(["a red circle", "", "a star"])
        assert torch.equal(cond["context"], want) and torch.equal(cond["context_mask"], want_mask)


class LabelledShapes(ShapesDataset):
    """`shapes` with a class label per sample (as a class-conditional dataset would yield)."""

    def __getitem__(self, index: int) -> dict:
        return dict(super().__getitem__(index), label=index % 3)


def test_labels_are_cached(stage1_ckpt, tmp_path):
    factory = functools.partial(LabelledShapes, size=4, val_size=2, resolution=32)
    manifest = build_cache(stage1_ckpt, ImageDataModule(factory, batch_size=2, num_workers=0), tmp_path,
                           device="cpu", progress=False)
    assert "label" in manifest["fields"] and manifest["splits"]["train"]["labels"]
    batch = next(iter(LatentDataModule(tmp_path, batch_size=4, num_workers=0, in_memory=False,
                                       shuffle_buffer=0).train_dataloader()))
    assert batch["label"].dtype == torch.long
    assert {k: int(v) for k, v in zip(batch["key"], batch["label"], strict=True)} == {
        f"shapes/train/{i:07d}": i % 3 for i in range(4)}


# ------------------------------------------------------------------------------------------ readers

def test_latent_datamodule_batches_memory_and_streaming_agree(cache16):
    out, manifest = cache16
    memory = LatentDataModule(out, batch_size=2, num_workers=0, in_memory=True)
    stream = LatentDataModule(out, batch_size=2, num_workers=0, in_memory=False, shuffle_buffer=5)
    assert memory.manifest == manifest and f"train: {TRAIN}, val: {VAL}" in memory.describe()
    batch = next(iter(stream.train_dataloader()))
    assert batch["mean"].shape == batch["logvar"].shape == (2, 4, 8, 8)
    assert batch["mean"].dtype == batch["logvar"].dtype == torch.float32
    assert isinstance(batch["caption"], list) and isinstance(batch["caption"][0], str)
    assert isinstance(batch["attributes"], list) and isinstance(batch["key"], list) and len(batch["key"]) == 2
    assert len(memory.train_dataloader()) == len(stream.train_dataloader()) == TRAIN // 2
    for split in ("train", "val"):
        loader = getattr(memory, f"{split}_dataloader")
        a = {k: (b["mean"][i], b["logvar"][i], b["caption"][i]) for b in loader() for i, k in enumerate(b["key"])}
        loader = getattr(stream, f"{split}_dataloader")
        b_ = {k: (b["mean"][i], b["logvar"][i], b["caption"][i]) for b in loader() for i, k in enumerate(b["key"])}
        assert a.keys() == b_.keys() and len(a) == {"train": TRAIN, "val": VAL}[split]
        assert all(torch.equal(a[k][0], b_[k][0]) and torch.equal(a[k][1], b_[k][1]) and a[k][2] == b_[k][2]
                   for k in a)
    # two epochs of the memory loader see the same samples in another order (epoch-seeded permutation)
    sampler = memory.train_dataloader().sampler
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == sorted(sampler) and first != list(sampler)
    auto = LatentDataModule(out, batch_size=2, num_workers=0)  # in_memory=None: small caches load into memory
    assert isinstance(auto.dataset("train"), LatentMemoryDataset)
    with pytest.raises(ValueError, match="no 'test' split"):
        LatentMemoryDataset(out, "test")
    with pytest.raises(FileNotFoundError, match="is not a latent cache"):
        LatentDataModule(out / "train")


def test_streaming_splits_ranks_evenly(cache16, monkeypatch):
    out, _ = cache16
    monkeypatch.setenv("WORLD_SIZE", "2")
    train, val = [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        ds = LatentShardDataset(out, "train", shuffle_buffer=4, seed=rank)
        train.append([s["key"] for s in ds])
        val.append([s["key"] for s in LatentShardDataset(out, "val")])
        assert len(ds) == TRAIN // 2
    # train: rank 0 reads shards 0 and 2 (6 samples), rank 1 shard 1 (4, re-read): both yield 5 per epoch
    assert len(train[0]) == len(train[1]) == TRAIN // 2
    assert len(set(train[1])) == 4 and set(train[0]).isdisjoint(train[1])
    # val: strided, disjoint, every sample once
    assert len(val[0]) == len(val[1]) == VAL // 2 and set(val[0]) | set(val[1]) == {
        f"shapes/val/{i:07d}" for i in range(VAL)}


def test_webdataset_source_maps_input_to_output_shards(stage1_ckpt, model, tmp_path):
    ae, _ = model
    src = ShapesDataset(split="train", size=8, resolution=32)
    write_shards((src[i] for i in range(8)), str(tmp_path / "in" / "train-%06d.tar"), maxcount=4)
    val = ShapesDataset(split="val", size=2, val_size=2, resolution=32)
    write_shards((val[i] for i in range(2)), str(tmp_path / "in" / "val-%06d.tar"), maxcount=4)
    factory = functools.partial(WebDatasetImages, urls=str(tmp_path / "in" / "train-{000000..000001}.tar"),
                                val_urls=str(tmp_path / "in" / "val-000000.tar"), resolution=32, crop="random",
                                flip=True, shuffle_buffer=100, epoch_size=50)
    data = ImageDataModule(factory, batch_size=8, num_workers=0)
    manifest = build_cache(stage1_ckpt, data, tmp_path / "out", device="cpu", progress=False, dtype="float32")
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [4, 4]
    assert manifest["splits"]["val"]["num_samples"] == 2
    cached = list(LatentMemoryDataset(tmp_path / "out", "train"))  # in shard order: the input order
    assert [s["caption"] for s in cached] == [src[i]["caption"] for i in range(8)]
    # canonical view (center crop, no flip) of lossless PNGs: the same latents as the map-style images
    images = torch.stack([src[i]["image"] for i in range(8)])
    with torch.no_grad():
        ref = torch.cat([ae.encode(images[:4]).mean, ae.encode(images[4:]).mean])
    assert torch.equal(torch.stack([s["mean"] for s in cached]), ref)
    with pytest.raises(ValueError, match="max_images needs a map-style dataset"):
        build_cache(stage1_ckpt, data, tmp_path / "o2", device="cpu", progress=False, max_images=3)


# --------------------------------------------------------------------------------------- command line

def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("cache", overrides=overrides)


def test_cache_config_composes_and_names_misspelt_keys():
    cfg = _compose(["autoencoder.pretrained=x.ckpt", "out_dir=y"])
    assert cfg.dtype == "float16" and list(cfg.splits) == ["train", "val"] and cfg.resolution is None
    assert cfg.get("text_encoder") is None and cfg.data.dataset._target_ == "ldm.data.shapes.ShapesDataset"
    with pytest.raises(ConfigCompositionException, match="shard_sz"):
        _compose(["autoencoder.pretrained=x.ckpt", "shard_sz=3"])


def _cli_args(ckpt: Path, out: Path) -> list[str]:
    return [f"autoencoder.pretrained={ckpt}", f"out_dir={out}", "data.dataset.size=12", "data.dataset.val_size=4", "shard_size=4",
            "batch_size=2", "data.num_workers=0", "progress=false", f"hydra.run.dir={out.parent / 'hydra'}"]


def test_cli_end_to_end(stage1_ckpt, tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "ldm.cache", *_cli_args(stage1_ckpt, out), "num_workers=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = read_manifest(out)
    assert manifest["resolution"] == 32  # resolution=null: the checkpoint's training resolution
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "val")] == [12, 4]
    assert len(manifest["splits"]["train"]["shards"]) == 3
    keys = [s["key"] for s in LatentMemoryDataset(out, "train")]  # 2 loader workers, shards in order
    assert keys == [f"shapes/train/{i:07d}" for i in range(12)]
    proc = subprocess.run([sys.executable, "-m", "ldm.cache", *_cli_args(stage1_ckpt, out), "shard_sz=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "shard_sz" in proc.stderr


def test_two_ranks_with_torchrun(stage1_ckpt, tmp_path):
    out = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         f"--master_port={free_port()}", "-m", "ldm.cache", *_cli_args(stage1_ckpt, out), "device=cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = read_manifest(out)
    assert manifest["world_size"] == 2
    ranks = {}
    keys: list[str] = []
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            ranks[shard["name"]] = json.loads((out / shard["name"]).with_suffix(".json").read_text())["rank"]
        keys += [s["key"] for s in LatentMemoryDataset(out, split)]
    # shard k of the run (train 0-2, then val 0) is written by rank k % 2
    assert list(ranks.values()) == [0, 1, 0, 1]
    assert len(keys) == len(set(keys)) == 16
    assert set(keys) == {f"shapes/train/{i:07d}" for i in range(12)} | {f"shapes/val/{i:07d}" for i in range(4)}


def test_wide_channel_spread_is_flagged_under_scale_norm():
    # stds of a real stage-1 run whose KL term let one channel grow (benchmarks/results/eval_h200.json, run A)
    wide = {"std": [4.13, 342.8, 1.23, 4.10], "scale": 0.0058, "shift": 1.82, "mean": [3.0, 1.5, 1.7, 1.2]}
    message = channel_spread_problem(wide, "scale")
    assert message is not None and "279x apart" in message and "latent_norm=channel" in message
    assert channel_spread_problem(wide, "channel") is None
    assert channel_spread_problem({**wide, "std": [2.24, 1.51, 1.55, 5.07]}, "scale") is None  # 3.4x: fine
