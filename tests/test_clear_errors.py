"""Mistakes that used to fail late, silently or with a raw traceback, now stop early with a message that names
what was wrong, where, and what to do (GitHub issue "Trustworthy long runs", point 7). One test per case:
a truncated shard, image sets with non-image files, sampler steps / guidance scale, resolution, and class
conditioning on data without labels."""

from __future__ import annotations

import logging
import re
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import compose_entry, run_entry
from PIL import Image
from torch import nn

import evaluate
import sample
from ldm.data.emoji import EmojiDataset
from ldm.data.fashion_mnist import FashionMNISTDataset
from ldm.data.images import ImageFolderDataset
from ldm.data.shapes import ShapesDataset
from ldm.data.shard_writer import write_shards
from ldm.data.shards import WebDatasetImages
from ldm.models.text_encoders import ClassEncoder
from ldm.pipeline import training_condition


def _compose(config: str, overrides: list[str], tmp: Path):
    return compose_entry(config, overrides, tmp / "run")


def _eval_cfg(overrides: list[str], tmp: Path):
    return _compose("evaluate", [f"out_dir={tmp}/out", f"stats_dir={tmp}/stats", f"results_csv={tmp}/results.csv",
                                 "num_workers=0", "progress=false", *overrides], tmp)


class _MeanColour(nn.Module):
    """A 3-d stand-in for the FID feature extractor (what is tested is which images arrive, not the network)."""

    name, dim = "mean-colour", 3

    def identity(self) -> dict:
        return {"name": self.name}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": images.float().mean((2, 3)) + 1e-3 * torch.arange(3.0)}


@pytest.fixture
def no_extractor(monkeypatch):
    """evaluate.py with the cheap extractor above."""
    monkeypatch.setattr(evaluate, "build_extractor", lambda name, weights=None: _MeanColour())


@pytest.fixture
def extractor_forbidden(monkeypatch):
    """A setting error must stop evaluate.py before it builds its (expensive) feature extractor."""
    def fail(*args, **kwargs):
        raise AssertionError("the feature extractor was built before the settings were checked")
    monkeypatch.setattr(evaluate, "build_extractor", fail)


def _shards(folder: Path, n: int, per_shard: int = 10) -> list[str]:
    ds = ShapesDataset("val", val_size=n, resolution=16)
    return write_shards(({**ds[i], "key": f"s{i:03d}"} for i in range(n)), str(folder / "x-%03d.tar"),
                        maxcount=per_shard)


def _cut(path: str, keep: float = 0.6) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])  # a copy that stopped part-way


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def _junk(folder: Path) -> Path:
    """What lands in real image folders: captions, metadata, an empty PNG and random bytes named .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("a caption")
    (folder / "b.json").write_text("{}")
    (folder / "c.png").write_bytes(b"")
    (folder / "d.jpg").write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1),
                                                 dtype=torch.uint8).numpy().tobytes())
    return folder


# ------------------------------------------------------------------------------------- 1. truncated shard

def test_truncated_shard_is_named_counted_and_cut_to_its_whole_samples(tmp_path, caplog):
    first, second, cut = _shards(tmp_path, 30)
    _cut(cut)
    reader = WebDatasetImages([first, cut], split="val", val_urls=[first, cut], resolution=16)
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        out = list(reader)
    warned = [r.getMessage() for r in caplog.records if cut in r.getMessage() and "truncated" in r.getMessage()]
    assert warned, "no warning names the truncated shard"
    whole = int(re.search(r"ended early after (\d+) whole samples", warned[0])[1])
    from_cut = [s for s in out if s["key"] >= "s020"]
    assert 0 < whole == len(from_cut) < 10 and len(out) == 10 + whole
    assert all(s["caption"] for s in out)  # the sample the cut went through is not used without its caption
    assert reader.bad.bad == 1 and sum(s["n_bad"] for s in out) == 1  # the loss is in the skipped count
    assert [k for k in reader.bad.bad_items if cut in k and "truncated" in k]
    # too many losses: the usual bad-data error, naming the shard and the setting
    strict = WebDatasetImages([first, second, cut], split="val", val_urls=[first, second, cut], resolution=16,
                              max_bad_fraction=0.02)
    with pytest.raises(RuntimeError, match="max_bad_fraction") as err:
        list(strict)
    assert cut in str(err.value) and "truncated" in str(err.value)


def test_fid_on_a_truncated_shard_counts_the_loss(tmp_path, no_extractor, caplog):
    shards = _shards(tmp_path / "sh", 20)
    _cut(shards[1])
    with caplog.at_level(logging.WARNING):
        res = evaluate.evaluate(_eval_cfg(["task=fid", f"real='{tmp_path}/sh/x-{{000..001}}.tar'",
                                           f"fake={_images(tmp_path / 'fake', 4)}"], tmp_path))
    warned = " ".join(r.getMessage() for r in caplog.records)
    whole = int(re.search(rf"{re.escape(shards[1])} is truncated .* ended early after (\d+) whole samples", warned)[1])
    assert res["n_bad"] == 1 and res["n_real"] == 10 + whole and 0 < whole < 10
    assert re.search(r"real=.*: 1 unreadable item\(s\) skipped .*x-001.tar \(truncated\)", warned)


def test_latent_cache_shards_are_checked_against_the_manifest(tmp_path):
    from ldm.data.latent_format import check_shard_files

    names = [Path(p).name for p in _shards(tmp_path, 20)]
    shards = [{"name": n, "num_samples": 10, "bytes": (tmp_path / n).stat().st_size} for n in names]
    check_shard_files(tmp_path, shards)  # whole: nothing to say
    _cut(str(tmp_path / names[1]))
    with pytest.raises(ValueError, match=rf"{names[1]}: \d+ bytes, the manifest says {shards[1]['bytes']}; .* "
                                         r"ended early after (\d+) whole samples; it should hold 10 samples"):
        check_shard_files(tmp_path, shards)


# ---------------------------------------------------------------------------- 2. non-images in image sets

def test_fid_ignores_non_images_and_names_a_set_without_images(tmp_path, no_extractor):
    junk = _junk(tmp_path / "junk")
    mixed = _images(_junk(tmp_path / "mixed"), 5)
    proc = run_entry("evaluate.py", "task=fid", f"real={junk}", f"fake={mixed}", f"out_dir={tmp_path}/out",
                     f"results_csv={tmp_path}/results.csv", "num_workers=0", "progress=false")
    assert proc.returncode == 1
    assert f"real={junk}: no readable images in this folder" in proc.stderr, proc.stderr[-3000:]
    assert "c.png" in proc.stderr and "d.jpg" in proc.stderr and "2 other file(s) ignored" in proc.stderr
    assert "features ->" not in proc.stderr  # stopped before the feature extractor was built

    res = evaluate.evaluate(_eval_cfg(["task=fid", f"real={mixed}", f"fake={mixed}"], tmp_path))
    assert res["n_real"] == res["n_images"] == 5 and res["n_bad"] == 4  # 2 broken images per set, once each

    with tarfile.open(tmp_path / "junk.tar", "w") as tar:  # a shard of captions and broken images only
        for name in ("a.txt", "b.json", "c.png", "d.jpg"):
            tar.add(junk / name, arcname=name)
    with pytest.raises(ValueError, match=r"fake=.*junk.tar: no readable images in this shards"):
        evaluate.evaluate(_eval_cfg(["task=fid", f"real={mixed}", f"fake={tmp_path}/junk.tar"], tmp_path))


# ----------------------------------------------------------------------------- 3. sampler steps and CFG

def test_sampler_steps_and_guidance_scale_are_checked_before_loading(tmp_path):
    missing = tmp_path / "missing.ckpt"  # never read: the settings must be refused first
    proc = run_entry("sample.py", f"ckpt={missing}", "prompts=a red circle", "steps=0", f"out_dir={tmp_path}/s")
    assert proc.returncode == 1 and "steps=0: the number of sampler steps must be a whole number >= 1" in proc.stderr
    assert "FileNotFoundError" not in proc.stderr, proc.stderr[-3000:]

    base = [f"ckpt={missing}", "prompts=x", f"out_dir={tmp_path}/s"]
    for override, message in [("steps=-3", "steps=-3"), ("cfg_scale=-1", "cfg_scale=-1: the classifier-free"),
                              ("sampler.cfg_scale=-2", "sampler.cfg_scale=-2:"), ("steps=2.5", "steps=2.5")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sample.sample(_compose("sample", [*base, override], tmp_path))
    for override, message in [("steps=0", "steps=0"), ("cfg_scale=-0.5", "cfg_scale=-0.5")]:  # evaluate.py too
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate.evaluate(_eval_cfg([f"ckpt={missing}", override], tmp_path))
    # 0 = unconditional and 1 = no guidance are legitimate scales
    from ldm.pipeline import check_sampling

    assert check_sampling(1, 0) == (1, 0.0) and check_sampling(50, 1.0, num_timesteps=1000) == (50, 1.0)
    with pytest.raises(ValueError, match=r"steps=1001: .* at most the 1000 training timesteps"):
        check_sampling(1001, 3.0, num_timesteps=1000)


# ------------------------------------------------------------------------------------------ 4. resolution

def test_resolution_is_checked_early_and_named(tmp_path, stage1_ckpt, extractor_forbidden):
    folder = _images(tmp_path / "imgs", 2)
    for value in ("0", "-3"):
        with pytest.raises(ValueError, match=rf"resolution={value}: the image side must be .* \[8, 4096\]"):
            evaluate.evaluate(_eval_cfg(["task=fid", f"real={folder}", f"fake={folder}", f"resolution={value}"],
                                        tmp_path))
    # the tiny autoencoder downsamples by 4: a 30 px image cannot go through it
    with pytest.raises(ValueError, match="resolution=30 is not a multiple of the autoencoder's downsampling factor 4"):
        evaluate.evaluate(_eval_cfg([f"ckpt={stage1_ckpt}", "resolution=30"], tmp_path))
    nowhere = tmp_path / "nowhere"  # the resolution is named before any file is looked for
    makers = [lambda r: ShapesDataset(resolution=r), lambda r: ImageFolderDataset(folder, resolution=r),
              lambda r: EmojiDataset(root=nowhere, resolution=r), lambda r: FashionMNISTDataset(nowhere, resolution=r),
              lambda r: WebDatasetImages(str(nowhere / "x-{0..3}.tar"), resolution=r)]
    for make in makers:
        for value in (0, -8):
            with pytest.raises(ValueError, match=f"resolution={value}: the image side must be a whole number"):
                make(value)


def test_cache_checks_resolution_before_encoding(tmp_path, stage1_ckpt):
    for value, message in (("0", "resolution=0: the image side must be a whole number"),
                           ("30", "resolution=30 is not a multiple of the autoencoder's downsampling factor 4")):
        proc = run_entry("-m", "ldm.cache", f"autoencoder.pretrained={stage1_ckpt}", f"out_dir={tmp_path / value}",
                         f"resolution={value}")
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / value).exists()


# --------------------------------------------------------------------------- 5. class labels that are not there

def test_class_conditioning_on_data_without_labels(tmp_path):
    encoder = ClassEncoder(num_classes=10, context_dim=8)
    batch = {"mean": torch.zeros(2, 4, 2, 2), "caption": ["a red circle", "a blue square"], "key": ["0", "1"]}
    for call in (lambda: training_condition(encoder, batch, torch.ones(2, dtype=torch.bool)),
                 lambda: encoder(batch["caption"])):
        with pytest.raises(ValueError, match="text_encoder=class conditions on class labels, but the data has no "
                                             "class labels") as err:
            call()
        assert "data=fashion_mnist" in str(err.value) and "another text_encoder" in str(err.value)
    labelled = training_condition(encoder, {**batch, "label": torch.tensor([3, 7])}, torch.tensor([True, False]))
    assert labelled["context"].shape == (2, 1, 8)
