"""Tests of ldm.data: datasets, shards, datamodule (CPU, a few seconds each)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.common import pil_to_tensor, tensor_to_uint8
from ldm.data.datamodules import ImageDataModule
from ldm.data.images import ImageFolderDataset
from ldm.data.shapes import BACKGROUNDS, COLORS, PHRASES, SHAPES, ShapesDataset, scene_split
from ldm.data.shards import WebDatasetImages, encode_image, expand_shard_urls, write_shards
from ldm.data.shards import main as shards_main

REPO = Path(__file__).resolve().parents[1]


def content_hash(sample: dict) -> str:
    return hashlib.sha1(tensor_to_uint8(sample["image"]).tobytes()).hexdigest()


def check_image(x: torch.Tensor, resolution: int) -> None:
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, resolution, resolution)
    assert x.min() >= -1.0 and x.max() <= 1.0


# ----------------------------------------------------------------------------------------------- shapes

def test_shapes_deterministic_and_order_independent():
    a = ShapesDataset(size=50, resolution=32, seed=3)
    b = ShapesDataset(size=50, resolution=32, seed=3)
    forward = [a[i] for i in range(10)]
    backward = [b[i] for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert torch.equal(x["image"], y["image"])
        assert (x["caption"], x["attributes"], x["key"]) == (y["caption"], y["attributes"], y["key"])
    other = ShapesDataset(size=50, resolution=32, seed=4)
    assert sum(other[i]["caption"] == forward[i]["caption"] for i in range(10)) < 5


def test_shapes_independent_of_worker_count():
    ds = ShapesDataset(size=12, resolution=16)
    single = next(iter(DataLoader(ds, batch_size=12, num_workers=0)))
    multi = torch.cat([b["image"] for b in DataLoader(ds, batch_size=3, num_workers=2)])
    assert torch.equal(single["image"], multi)


def test_shapes_splits_disjoint():
    train = ShapesDataset("train", size=2000, resolution=16)
    seen_images = {content_hash(train[i]) for i in range(len(train))}
    seen_pairs = {(train[i]["caption"], train[i]["attributes"]) for i in range(len(train))}
    for split in ("val", "test"):
        ds = ShapesDataset(split, val_size=300, resolution=16)
        for i in range(len(ds)):
            assert scene_split(ds.scene(i)) == split  # the construction that makes splits disjoint
            s = ds[i]
            assert content_hash(s) not in seen_images
            assert (s["caption"], s["attributes"]) not in seen_pairs
    # Same captions across splits are fine (a caption describes many scenes), identical scenes are not.
    assert scene_split(train.scene(0)) == "train"


def test_shapes_captions_and_attributes_agree():
    ds = ShapesDataset(size=200, resolution=64, min_shapes=1, max_shapes=3)
    pattern = re.compile(r"\b(small|large) (\w+) (" + "|".join(SHAPES) + r")\b")
    counts = set()
    for i in range(len(ds)):
        s = ds[i]
        attrs = json.loads(s["attributes"])
        shapes = attrs["shapes"]
        counts.add(len(shapes))
        assert 1 <= len(shapes) <= 3
        assert s["caption"].endswith(f"on a {attrs['background']} background") or s["caption"].endswith(
            f"on an {attrs['background']} background")
        assert len(pattern.findall(s["caption"])) == len(shapes)
        for sh in shapes:
            assert f"{sh['size']} {sh['color']} {sh['shape']} {PHRASES[sh['position']]}" in s["caption"]
            assert sh["color"] != attrs["background"]
            x0, y0, x1, y1 = sh["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            # The pixel at the shape's centre has the shape's colour; the image corner is background.
            px = (s["image"] + 1) * 127.5
            cx, cy = (int(c * 64) for c in sh["center"])
            assert torch.allclose(px[:, cy, cx], torch.tensor(COLORS[sh["color"]], dtype=torch.float32), atol=2)
        assert torch.allclose(((s["image"] + 1) * 127.5)[:, 0, 0],
                              torch.tensor(BACKGROUNDS[attrs["background"]], dtype=torch.float32), atol=2)
        boxes = [sh["bbox"] for sh in shapes]
        for j in range(len(boxes)):
            for k in range(j + 1, len(boxes)):
                a, b = boxes[j], boxes[k]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "shapes overlap"
    assert counts == {1, 2, 3}


@pytest.mark.parametrize("resolution", [8, 33, 64, 128])
def test_shapes_resolutions(resolution):
    ds = ShapesDataset(size=4, resolution=resolution)
    s = ds[1]
    check_image(s["image"], resolution)
    assert s["attributes"] == ShapesDataset(size=4, resolution=64)[1]["attributes"]  # same scene at any size
    assert s["n_bad"] == 0 and s["key"] == "shapes/train/0000001"


def test_shapes_antialiased():
    img = tensor_to_uint8(ShapesDataset(size=1, resolution=64, min_shapes=3)[0]["image"])
    palette = {tuple(c) for c in list(COLORS.values()) + list(BACKGROUNDS.values())}
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(colours - palette) > 10  # edge pixels mix shape and background colours


def test_shapes_render_speed():
    ds = ShapesDataset(size=300, resolution=64)
    ds[0]
    best = float("inf")
    for r in range(3):
        t = time.perf_counter()
        for i in range(100 * r, 100 * (r + 1)):
            ds[i]
        best = min(best, (time.perf_counter() - t) / 100)
    assert best < 2e-3, f"one 64x64 sample took {best * 1e3:.2f} ms"


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="validation")
    with pytest.raises(ValueError, match="resolution"):
        ShapesDataset(resolution=4)
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesDataset(max_shapes=10)
    with pytest.raises(IndexError):
        ShapesDataset(size=3)[3]


# ----------------------------------------------------------------------------------------------- folder

def _save(path: Path, img: Image.Image, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def _jpeg_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    rng = np.random.default_rng(0)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    arr[..., 0] = color[0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """40 good images (png/jpg, RGB/RGBA/L, nested) + a corrupt file and a truncated JPEG."""
    root = tmp_path / "imgs"
    entries = []
    for i in range(40):
        sub = "sub/" if i % 3 == 0 else ""
        ext = ".png" if i % 2 else ".jpg"
        mode = "L" if i % 5 == 0 else "RGB"
        img = Image.new(mode, (48 + i, 32), 128 if mode == "L" else (i * 5, 100, 200))
        _save(root / f"{sub}img{i:02d}{ext}", img)
        if i < 10:
            (root / f"{sub}img{i:02d}.txt").write_text(f"caption from txt {i}\n")
        elif i < 20:
            entries.append({"file": f"{sub}img{i:02d}{ext}", "caption": f"caption from jsonl {i}",
                            "attributes": {"i": i}})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    (root / "img05b_corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    jpeg = _jpeg_bytes()
    (root / "img25b_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.md").write_text("not an image")
    return root


def test_folder_captions_and_samples(image_folder):
    ds = ImageFolderDataset(image_folder, split="all", resolution=16, max_bad_fraction=0.2)
    assert len(ds) == 42
    assert ds.n_missing_captions == 42 - 20
    by_key = {}
    for i in range(len(ds)):
        s = ds[i]
        check_image(s["image"], 16)
        by_key[s["key"]] = s
    assert by_key["sub/img03.png"]["caption"] == "caption from txt 3"
    assert by_key["img11.png"]["caption"] == "caption from jsonl 11"
    assert json.loads(by_key["img11.png"]["attributes"]) == {"i": 11}
    assert by_key["img31.png"]["caption"] == "" and by_key["img31.png"]["attributes"] == "{}"
    # Bad files are skipped (the next good file is returned) and counted, per sample and in total.
    assert "img05b_corrupt.jpg" not in by_key and "img25b_truncated.jpg" not in by_key
    assert ds.bad.bad == 2 and set(ds.bad.bad_items) == {"img05b_corrupt.jpg", "img25b_truncated.jpg"}
    assert sum(ds[i]["n_bad"] for i in range(len(ds))) == 2
    assert "truncated" in ds.bad.bad_items["img25b_truncated.jpg"]


def test_folder_pixels_resize_crop_flip(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    _save(tmp_path / "a.png", Image.fromarray(arr))
    _save(tmp_path / "b.png", Image.new("RGBA", (10, 10), (0, 0, 0, 0)))  # transparent -> white
    _save(tmp_path / "c.png", Image.fromarray(np.full((10, 10), 128 * 257, np.uint16)))  # 16-bit gray
    ds = ImageFolderDataset(tmp_path, split="all", resolution=10)
    a = ds[0]["image"]
    check_image(a, 10)
    assert a[0, :, 0].min() > 0.9 and a[2, :, -1].min() > 0.9  # center crop of 20x10 keeps red left, blue right
    assert torch.equal(ds[1]["image"], torch.ones(3, 10, 10))
    assert Image.open(tmp_path / "c.png").mode == "I;16"
    assert (tensor_to_uint8(ds[2]["image"]) == 128).all()  # 16-bit rescaled, not clipped at 255
    rnd = ImageFolderDataset(tmp_path, split="train", val_fraction=0.0, resolution=10, crop="random", flip=True)
    crops = {tensor_to_uint8(rnd[0]["image"]).tobytes() for _ in range(30)}
    assert len(crops) > 3  # random offsets and flips vary
    val = ImageFolderDataset(tmp_path, split="val", val_fraction=0.5, resolution=10, crop="random", flip=True)
    assert len({tensor_to_uint8(val[0]["image"]).tobytes() for _ in range(10)}) == 1  # no augmentation


def test_folder_splits(image_folder):
    train = ImageFolderDataset(image_folder, split="train", val_fraction=0.2)
    val = ImageFolderDataset(image_folder, split="val", val_fraction=0.2)
    assert set(train.files).isdisjoint(val.files) and len(train) + len(val) == 42 and len(val) > 0
    assert ImageFolderDataset(image_folder, split="val", val_fraction=0.2).files == val.files


def test_folder_too_many_bad_raises(tmp_path):
    for i in range(4):
        _save(tmp_path / f"good{i}.png", Image.new("RGB", (8, 8)))
    for i in range(20):
        (tmp_path / f"bad{i:02d}.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, split="all", resolution=8, max_bad_fraction=0.05)
    with pytest.raises(RuntimeError, match="max_bad_fraction") as err:
        for i in range(len(ds)):
            ds[i]
    assert "bad00.jpg" in str(err.value) and "bad19.jpg" in str(err.value)


def test_folder_all_bad_raises_early(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(RuntimeError, match="all 3 images"):
        ImageFolderDataset(tmp_path, split="all", resolution=8)[0]


def test_folder_missing_and_empty(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataset(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty.*\.jpg"):
        ImageFolderDataset(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- shards

@pytest.fixture
def shapes_shards(tmp_path) -> tuple[Path, ShapesDataset]:
    ds = ShapesDataset(size=40, resolution=16)
    written = write_shards((ds[i] for i in range(len(ds))), str(tmp_path / "s" / "shard-%06d.tar"), maxcount=10)
    assert [Path(p).name for p in written] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert sorted(os.listdir(tmp_path / "s")) == [f"shard-{i:06d}.tar" for i in range(4)]
    return tmp_path / "s", ds


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


# ------------------------------------------------------------------------------------------ emoji, fmnist

def _emoji_or_skip(vendor: str):
    from ldm.data.emoji import find_emoji_package

    try:
        return find_emoji_package(vendor)
    except FileNotFoundError:
        pytest.skip(f"npm package emoji-datasource-{vendor} not installed (npm install emoji-datasource-{vendor}, "
                    "or set LDM_EMOJI_ROOT)")


def test_emoji_missing_package_message(tmp_path):
    from ldm.data.emoji import EmojiDataset

    with pytest.raises(FileNotFoundError, match="npm install emoji-datasource-google"):
        EmojiDataset(root=tmp_path, vendor="google")


@pytest.mark.parametrize("vendor", ["twitter", "google"])
def test_emoji_dataset(vendor):
    from ldm.data.emoji import EmojiDataset

    _emoji_or_skip(vendor)
    train = EmojiDataset(split="train", vendor=vendor)
    val = EmojiDataset(split="val", vendor=vendor, resolution=32)
    assert len(train) > 1000 and 20 < len(val) < 300
    assert {it["file"] for it in train.items}.isdisjoint(it["file"] for it in val.items)
    s = train[0]
    check_image(s["image"], 64)
    assert re.fullmatch(r"an? [a-z0-9].*", s["caption"]) and s["n_bad"] == 0
    assert json.loads(s["attributes"])["vendor"] == vendor and s["key"].endswith(".png")
    assert any(it["caption"] == "a grinning face" for it in train.items + val.items)
    check_image(val[0]["image"], 32)
    assert torch.equal(s["image"][:, 0, 0], torch.ones(3))  # transparent corner composited on white


def test_fashion_mnist_synthetic_idx(tmp_path):
    from ldm.data.fashion_mnist import FashionMNISTDataset, read_idx

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = (np.arange(30) % 10).astype(np.uint8)
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(b"\x00\x00\x08\x03" + np.array([30, 28, 28], ">u4").tobytes() + imgs.tobytes())
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(
            b"\x00\x00\x08\x01" + np.array([30], ">u4").tobytes() + labels.tobytes())
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    val = FashionMNISTDataset(tmp_path, split="val", resolution=28, val_size=5)
    assert len(val) == 5 and len(FashionMNISTDataset(tmp_path, split="train", resolution=28, val_size=5)) == 25
    s = val[0]
    assert torch.equal(s["image"][1], torch.from_numpy(imgs[25]).float() / 127.5 - 1)
    assert json.loads(s["attributes"])["label"] == 5 and s["caption"] == "a sandal"
    (tmp_path / "bad-idx").write_bytes(b"\x00\x00\x08\x01" + np.array([30], ">u4").tobytes() + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad-idx")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataset(tmp_path / "nope")


def test_fashion_mnist_real():
    from ldm.data.fashion_mnist import DEFAULT_ROOT, FashionMNISTDataset

    if not Path(DEFAULT_ROOT).is_dir():
        pytest.skip(f"{DEFAULT_ROOT} missing (apt-get install dataset-fashion-mnist)")
    test = FashionMNISTDataset(split="test", resolution=32)
    assert len(test) == 10000
    s = test[0]
    check_image(s["image"], 32)
    assert s["caption"] == "an ankle boot" and json.loads(s["attributes"])["label"] == 9
    assert torch.equal(s["image"][0], s["image"][2])  # gray replicated


# ------------------------------------------------------------------------------------------- datamodule

def test_datamodule_batches_and_reproducibility():
    factory = functools.partial(ShapesDataset, size=20, val_size=6, resolution=16)
    dm = ImageDataModule(factory, batch_size=8, val_batch_size=4, num_workers=0, seed=1)
    train = dm.train_dataloader()
    batches = list(train)
    assert len(batches) == 2  # drop_last
    b = batches[0]
    assert b["image"].shape == (8, 3, 16, 16) and b["n_bad"].dtype == torch.long and b["n_bad"].shape == (8,)
    assert isinstance(b["caption"], list) and isinstance(b["caption"][0], str) and len(b["attributes"]) == 8
    assert dm.dataset("train") is dm.dataset("train")
    val = list(dm.val_dataloader())
    assert [len(v["key"]) for v in val] == [4, 2] and val[0]["key"][0] == "shapes/val/0000000"
    again = ImageDataModule(factory, batch_size=8, num_workers=0, seed=1).train_dataloader()
    other = ImageDataModule(factory, batch_size=8, num_workers=0, seed=2).train_dataloader()
    assert next(iter(again))["key"] == b["key"] != next(iter(other))["key"]
    text = dm.describe()
    assert "ShapesDataset" in text and "train: 20 samples" in text and "val: 6 samples" in text


def test_datamodule_random_crops_reproducible_with_workers(image_folder):
    factory = functools.partial(ImageFolderDataset, image_folder, resolution=12, crop="random", flip=True,
                                max_bad_fraction=0.3)

    def first_batches(seed):
        dm = ImageDataModule(factory, batch_size=6, num_workers=2, seed=seed, persistent_workers=False)
        return [b["image"] for b in itertools.islice(dm.train_dataloader(), 3)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_datamodule_webdataset(shapes_shards):
    folder, _ = shapes_shards
    factory = functools.partial(WebDatasetImages, str(folder), val_urls=str(folder / "shard-000000.tar"),
                                resolution=16, epoch_size=24)
    dm = ImageDataModule(factory, batch_size=8, num_workers=0)
    assert len(dm.train_dataloader()) == 3 and sum(len(b["key"]) for b in dm.train_dataloader()) == 24
    assert sum(len(b["key"]) for b in dm.val_dataloader()) == 10
    with pytest.raises(TypeError, match="_partial_"):
        ImageDataModule(ShapesDataset(size=4))


def test_pil_tensor_round_trip():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = pil_to_tensor(Image.fromarray(arr))
    assert x.shape == (3, 5, 7) and np.array_equal(tensor_to_uint8(x), arr)


def test_data_package_imports_no_lightning_or_hydra():
    code = ("import sys, ldm.data.common, ldm.data.shapes, ldm.data.images, ldm.data.shards, ldm.data.emoji, "
            "ldm.data.fashion_mnist, ldm.data.datamodules; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')]; print(bad); assert not bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


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
