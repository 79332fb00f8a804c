"""Fashion-MNIST (Xiao et al. 2017) from its idx files, as captioned RGB images.

The Debian package ``dataset-fashion-mnist`` installs ``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` into
/usr/share/datasets/fashion-mnist; any folder with these files (gzipped or not) works.
Splits: train = the first 55,000 training images, val = the last 5,000, test = the 10,000 t10k images.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.common import (
    article,
    check_choice,
    check_index,
    check_resolution,
    make_sample,
    pil_to_tensor,
    with_label,
)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
CAPTIONS = tuple(article(c.lower()) if c != "Trouser" else "a pair of trousers" for c in CLASS_NAMES)
SPLITS = ("train", "val", "test")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (plain or .gz): magic 0x0000 <dtype byte> <ndim byte>, ndim big-endian uint32 sizes,
    then the data in row-major order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int(x) for x in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(data) - offset} "
                         "bytes follow; the file is truncated or corrupt")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {str(root)!r}. Install Fashion-MNIST with "
        f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_ROOT}) or pass root=<folder with the "
        "idx files>."
    )


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST as captioned images (see the module docstring).

    Args:
        root: folder with the idx files.
        split: "train" (55,000), "val" (last 5,000 of the training file) or "test" (10,000).
        resolution: output side; the 28 x 28 grayscale images are resized with bicubic filtering.
        flip: random horizontal flips of the train split.
        val_size: how many of the last training images form the val split.

    Yields dicts: image FloatTensor [3, resolution, resolution] in [-1, 1] (gray replicated to RGB; white
    garment on black), caption e.g. "an ankle boot", attributes {"label": int, "class_name": str},
    key "fashion_mnist/<split>/<index>", n_bad = 0.
    """

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, split: str = "train", resolution: int = 32,
                 flip: bool = False, val_size: int = 5000) -> None:
        self.root = Path(root).expanduser()
        self.split = check_choice("split", split, SPLITS)
        self.resolution = check_resolution(resolution)
        self.flip = bool(flip) and split == "train"  # augmentation is for training only
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST folder {str(self.root)!r} does not exist. Install it with "
                f"`apt-get install dataset-fashion-mnist` (into {DEFAULT_ROOT}) or pass root=<folder with "
                "train-images-idx3-ubyte.gz and the other idx files>."
            )
        image_stem, label_stem = _FILES["test" if split == "test" else "train"]
        images = read_idx(find_idx(self.root, image_stem))
        labels = read_idx(find_idx(self.root, label_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{self.root}: images {images.shape} and labels {labels.shape} do not match")
        self.offset = 0  # index of the first sample in its idx file (keys name the file position)
        if split != "test":
            if not 0 < val_size < len(images):
                raise ValueError(f"val_size must be in (0, {len(images)}), got {val_size}")
            cut = len(images) - val_size
            self.offset = cut if split == "val" else 0
            images, labels = (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
        self.images = np.ascontiguousarray(images)  # copies only this split out of the file buffer
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        index = check_index(index, len(self.labels), "FashionMNISTDataset")
        img = Image.fromarray(self.images[index], mode="L")
        if img.size != (self.resolution, self.resolution):
            img = img.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        if self.flip and bool(torch.rand(()) < 0.5):  # torch RNG: seeded per DataLoader worker
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        label = int(self.labels[index])
        attributes = with_label(None, label, CLASS_NAMES[label])
        return make_sample(pil_to_tensor(img.convert("RGB")), CAPTIONS[label], attributes,
                           f"fashion_mnist/{self.split}/{index + self.offset:05d}")

    def __repr__(self) -> str:
        return (f"FashionMNISTDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"resolution={self.resolution})")
