"""WebDataset shards (ldm.data.shards, ldm.data.shard_writer): exact round trips, atomic writes, URL expansion,
broken members, disjoint ranks and workers, epoch sizes, and the command line (CPU, a few seconds each)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch
from data_fixtures import REPO
from data_fixtures import shapes_shards as shapes_shards
from torch.utils.data import DataLoader

from ldm.data.shapes import ShapesDataset
from ldm.data.shard_writer import encode_image, write_shards
from ldm.data.shards import WebDatasetImages, expand_shard_urls
from ldm.data.shards import main as shards_main

# ----------------------------------------------------------------------------------------------- shards


def test_shards_round_trip_exact(shapes_shards):
    folder, ds = shapes_shards
    reader = WebDatasetImages(str(folder / "shard-{000000..000003}.tar"), resolution=16, shuffle_buffer=0)
    got = {s["key"]: s for s in reader}
    assert len(got) == 40
    for i in range(len(ds)):
        ref = ds[i]
        s = got[ref["key"]]
        assert torch.equal(s["image"], ref["image"])  # png is lossless
        assert (s["caption"], s["attributes"], s["n_bad"]) == (ref["caption"], ref["attributes"], 0)


def test_shards_jpeg_near_equal_and_json_caption(tmp_path):
    ds = ShapesDataset(size=5, resolution=32)
    write_shards((ds[i] for i in range(5)), str(tmp_path / "j-%03d.tar"), image_format="jpg")
    out = sorted(WebDatasetImages(str(tmp_path / "j-000.tar"), resolution=32, shuffle_buffer=0),
                 key=lambda s: s["key"])
    assert len(out) == 5
    assert all((o["image"] - ds[i]["image"]).abs().mean() < 0.05 for i, o in enumerate(out))
    with tarfile.open(tmp_path / "c.tar", "w") as tar:  # no .txt: caption comes from the json
        for name, data in (("k1.png", encode_image(ds[0]["image"])), ("k1.json", b'{"caption": "from json"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (s,) = list(WebDatasetImages(str(tmp_path / "c.tar"), resolution=32))
    assert s["caption"] == "from json" and json.loads(s["attributes"]) == {"caption": "from json"}


def test_write_shards_atomic_on_crash(tmp_path):
    ds = ShapesDataset(size=30, resolution=8)

    def samples():
        for i in range(25):
            yield ds[i]
        raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        write_shards(samples(), str(tmp_path / "shard-%06d.tar"), maxcount=10)
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar", "shard-000001.tar"]  # no partial third shard
    with pytest.raises(ValueError, match="printf"):
        write_shards(iter([]), str(tmp_path / "shard.tar"))


def test_expand_shard_urls(shapes_shards):
    folder, _ = shapes_shards
    assert len(expand_shard_urls(str(folder / "shard-{000000..000003}.tar"))) == 4
    assert expand_shard_urls(str(folder)) == sorted(str(p) for p in folder.glob("*.tar"))
    assert len(expand_shard_urls(str(folder / "shard-00000[0-1].tar"))) == 2
    assert expand_shard_urls(["pipe:cat x.tar"]) == ["pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match="shard-000005.tar") as err:
        expand_shard_urls(str(folder / "shard-{000000..000005}.tar"))
    assert "2 shard path(s)" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        WebDatasetImages(str(folder / "nowhere-{0..3}.tar"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_shards_broken_members_and_tar_skipped(tmp_path, shapes_shards):
    folder, ds = shapes_shards
    good = encode_image(ds[0]["image"])
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i in range(10):
            _add(tar, f"g{i:02d}.png", good)
            _add(tar, f"g{i:02d}.txt", b"fine")
            if i == 4:
                _add(tar, "corrupt.png", b"\x89PNG\r\n\x1a\nbroken")
                _add(tar, "noimage.txt", b"a caption without an image")
    data = (folder / "shard-000001.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])  # truncated shard
    reader = WebDatasetImages([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], resolution=16,
                              shuffle_buffer=0, max_bad_fraction=0.5)
    out = list(reader)
    keys = [s["key"] for s in out]
    assert {f"g{i:02d}" for i in range(10)} <= set(keys) and "corrupt" not in keys and "noimage" not in keys
    assert 1 <= len(out) - 10 < 10  # the intact head of the truncated shard is still read
    assert reader.bad.bad >= 3 and sum(s["n_bad"] for s in out) >= 2
    assert any("corrupt" in k for k in reader.bad.bad_items) and any("noimage" in k for k in reader.bad.bad_items)
    with tarfile.open(tmp_path / "mostly_bad.tar", "w") as tar:
        for i in range(30):
            _add(tar, f"m{i:02d}.png", good if i % 2 else b"not a png")
    with pytest.raises(RuntimeError, match="max_bad_fraction") as err:
        list(WebDatasetImages(str(tmp_path / "mostly_bad.tar"), resolution=16, max_bad_fraction=0.05))
    assert re.search(r"mostly_bad\.tar:m\d\d: ", str(err.value))  # names the bad members


def test_shards_disjoint_ranks_and_workers(shapes_shards, monkeypatch):
    folder, _ = shapes_shards
    pattern = str(folder / "shard-{000000..000003}.tar")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append({s["key"] for s in WebDatasetImages(pattern, resolution=16)})
    assert len(per_rank[0]) == len(per_rank[1]) == 20 and per_rank[0].isdisjoint(per_rank[1])
    monkeypatch.setenv("RANK", "1")  # built on rank 1; iterated where the rank is unknown ("spawn" workers)
    built_on_rank1 = WebDatasetImages(pattern, resolution=16)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert {s["key"] for s in built_on_rank1} == per_rank[1]
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(ValueError, match="5 ranks"):
        list(WebDatasetImages(pattern, resolution=16))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    loader = DataLoader(WebDatasetImages(pattern, resolution=16), batch_size=4, num_workers=2)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 40 and len(set(keys)) == 40


def test_shards_epoch_size(shapes_shards):
    folder, _ = shapes_shards
    ds = WebDatasetImages(str(folder), resolution=16, epoch_size=50, shuffle_buffer=8, seed=1)
    assert len(ds) == 50
    first, second = [s["key"] for s in ds], [s["key"] for s in ds]
    assert len(first) == 50 and len(set(first)) == 40 and first != second  # wraps around, reshuffles
    loader = DataLoader(ds, batch_size=5, num_workers=2)
    assert len(loader) == 10 and sum(len(b["key"]) for b in loader) == 50
    assert WebDatasetImages(str(folder), split="val", val_urls=str(folder), epoch_size=50).epoch_size is None
    with pytest.raises(ValueError, match="val_urls"):
        WebDatasetImages(str(folder), split="val")


def test_shards_cli(tmp_path):
    out = tmp_path / "cli" / "s-%06d.tar"
    cmd = [sys.executable, "-m", "ldm.data.shards", "--source", "shapes", "--split", "val", "--n", "25",
           "--resolution", "16", "--out", str(out), "--maxcount", "10"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "wrote 25 samples" in res.stdout
    samples = list(WebDatasetImages(str(tmp_path / "cli" / "s-{000000..000002}.tar"), resolution=16))
    ref = ShapesDataset("val", val_size=25, resolution=16)
    assert sorted(s["caption"] for s in samples) == sorted(ref[i]["caption"] for i in range(25))
    with pytest.raises(SystemExit, match="--root"):
        shards_main(["--source", "folder", "--out", str(out)])


def test_shards_uneven_across_ranks_still_give_equal_batch_counts(tmp_path, monkeypatch):
    """5 shards on 2 ranks (3 + 2) with 4 workers each: with an epoch size, every rank must yield the same
    number of batches, or DDP hangs in the next all-reduce of the rank that still has data."""
    ds = ShapesDataset(size=50, resolution=16)
    write_shards((ds[i] for i in range(50)), str(tmp_path / "u-%06d.tar"), maxcount=10)
    pattern = str(tmp_path / "u-{000000..000004}.tar")
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        data = WebDatasetImages(pattern, resolution=16, epoch_size=100, shuffle_buffer=1)
        loader = DataLoader(data, batch_size=12, num_workers=4, drop_last=True)
        counts.append(sum(1 for _ in loader))
    assert counts[0] == counts[1] > 0, counts
