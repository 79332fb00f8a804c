"""Building the latent cache: exactness against the autoencoder, manifest and shards, resume after an
interruption, refused checkpoints and caches, the command line and two ranks under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cache_fixtures import BATCH, TRAIN, VAL, _cache
from cache_fixtures import cache16 as cache16
from cache_fixtures import model as model
from helpers import free_port
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from stage2_fixtures import make_stage1_checkpoint, shapes_batch

import ldm.cache
from ldm.checkpoint import build_autoencoder, load_checkpoint
from ldm.data.latent_format import autoencoder_identity, check_cache_compatible, read_manifest
from ldm.data.latents import LatentMemoryDataset
from ldm.data.shapes import ShapesDataset

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")


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


def test_two_processes_building_one_cache_take_turns(stage1_ckpt, tmp_path, caplog):
    """Two builders of the same folder at once (jobs of a sweep on the default cache folder): before, each deleted
    the other's unfinished shards (".tmp-" files) and one failed. Now the second waits for the first and finds
    every shard done; both return the complete manifest."""
    import threading

    out, results, errors = tmp_path / "cache", [], []

    def build():
        try:
            results.append(_cache(stage1_ckpt, out))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    with caplog.at_level("INFO", logger="ldm.cache"):
        threads = [threading.Thread(target=build) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 2 and all(r["splits"]["train"]["num_samples"] == TRAIN for r in results)
    assert "waiting for it to finish" in caplog.text
    assert "0 of its 4 shards to write (4 already done)" in caplog.text  # the second builder wrote nothing again
    assert read_manifest(out)["splits"]["val"]["num_samples"] == VAL
