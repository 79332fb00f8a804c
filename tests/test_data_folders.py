"""Image folders (ImageFolderDataset: captions, pixels, splits, bad files) and what loads every dataset:
ImageDataModule, the tensor <-> PIL helpers, and ldm.data's light imports (CPU, a few seconds each)."""

from __future__ import annotations

import functools
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import REPO, check_image
from data_fixtures import shapes_shards as shapes_shards
from PIL import Image

from ldm.data.common import pil_to_tensor, tensor_to_uint8
from ldm.data.datamodules import ImageDataModule
from ldm.data.images import ImageFolderDataset
from ldm.data.shapes import ShapesDataset
from ldm.data.shards import WebDatasetImages

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
    code = ("import sys, ldm.data.common, ldm.data.shapes, ldm.data.images, ldm.data.shards, ldm.data.shard_writer, "
            "ldm.data.emoji, ldm.data.fashion_mnist, ldm.data.datamodules; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')]; print(bad); assert not bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
