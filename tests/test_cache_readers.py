"""Reading a latent cache for training: the in-memory and streaming readers, even rank splits, a WebDataset
source, cached text embeddings and labels, posterior sampling and latent normalisation."""

from __future__ import annotations

import functools

import pytest
import torch
from cache_fixtures import TRAIN, VAL, _cache
from cache_fixtures import cache16 as cache16
from cache_fixtures import model as model
from torch import nn

from ldm.cache import build_cache
from ldm.data.datamodules import ImageDataModule
from ldm.data.latent_format import autoencoder_identity, check_cache_compatible
from ldm.data.latents import LatentDataModule, LatentMemoryDataset, LatentShardDataset
from ldm.data.shapes import ShapesDataset
from ldm.data.shard_writer import write_shards
from ldm.data.shards import WebDatasetImages
from ldm.models.distributions import sample_posterior
from ldm.models.latent_stats import channel_spread_problem, denormalize_latents, normalize_latents
from ldm.pipeline import training_condition

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


def test_wide_channel_spread_is_flagged_under_scale_norm():
    # stds of a real stage-1 run whose KL term let one channel grow (benchmarks/results/eval_h200.json, run A)
    wide = {"std": [4.13, 342.8, 1.23, 4.10], "scale": 0.0058, "shift": 1.82, "mean": [3.0, 1.5, 1.7, 1.2]}
    message = channel_spread_problem(wide, "scale")
    assert message is not None and "279x apart" in message and "latent_norm=channel" in message
    assert channel_spread_problem(wide, "channel") is None
    assert channel_spread_problem({**wide, "std": [2.24, 1.51, 1.55, 5.07]}, "scale") is None  # 3.4x: fine


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
