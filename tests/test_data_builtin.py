"""The built-in datasets of ldm.data: procedural `shapes` (determinism, disjoint splits, captions that match
the pixels, speed), emoji from the npm packages, and Fashion-MNIST (CPU, a few seconds each)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import check_image
from torch.utils.data import DataLoader

from ldm.data.common import tensor_to_uint8
from ldm.data.shapes import BACKGROUNDS, COLORS, PHRASES, SHAPES, ShapesDataset, scene_split


def content_hash(sample: dict) -> str:
    return hashlib.sha1(tensor_to_uint8(sample["image"]).tobytes()).hexdigest()


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
