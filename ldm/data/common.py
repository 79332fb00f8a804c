"""Shared pieces of every ldm dataset: the sample dict, image transforms and bad-data accounting.

Every dataset yields ``{"image": FloatTensor [3, H, W] in [-1, 1], "caption": str, "attributes": str (JSON
text, "{}" if none), "key": str, "n_bad": int}`` so that torch's default collate gives a batch of
``image [B, 3, H, W]``, lists of str and ``n_bad`` as a LongTensor [B].
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CROP_MODES = ("center", "random")
WHITE = (255, 255, 255)


def stable_hash(*parts: Any) -> int:
    """A 64-bit hash of ``repr(parts)`` that is the same in every process and Python run.

    (Python's built-in ``hash`` of str is salted per process, so it cannot pick splits or seeds.)
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def unit_hash(*parts: Any) -> float:
    """``stable_hash`` mapped to [0, 1); used to assign items to splits by a fraction."""
    return stable_hash(*parts) / 2.0**64


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming the argument."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")
    return value


def check_resolution(resolution: int, low: int = 8, high: int = 4096, factor: int | None = None,
                     key: str = "resolution") -> int:
    """``resolution`` (the image side in pixels) if it is an int in [low, high] and, when ``factor`` (an
    autoencoder's downsampling factor) is given, a multiple of it; else a ValueError naming ``key``."""
    if not isinstance(resolution, int) or isinstance(resolution, bool) or not low <= resolution <= high:
        raise ValueError(f"{key}={resolution!r}: the image side must be a whole number of pixels in [{low}, {high}] "
                         f"(e.g. {key}=64)")
    if factor is not None and resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise ValueError(f"{key}={resolution} is not a multiple of the autoencoder's downsampling factor {factor}; "
                         f"use e.g. {key}={lower} or {key}={lower + factor}")
    return resolution


def check_fraction(name: str, value: float, allow_one: bool = False) -> float:
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 <= value and upper_ok):
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {value!r}")
    return float(value)


def article(phrase: str) -> str:
    """Prefix "a"/"an" by the first letter (good enough for generated captions)."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto ``background``.

    A plain ``convert("RGB")`` drops alpha and exposes whatever colour the transparent pixels happen to store
    (often black), which would teach the model junk borders.
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: PIL's convert would clip at 255, so rescale 16-bit to 8-bit first.
        arr = np.asarray(img, dtype=np.float32)
        arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image (H x W) -> float32 tensor [3, H, W] in [-1, 1] (uint8 u maps to u / 127.5 - 1)."""
    if img.mode != "RGB":
        img = to_rgb(img)
    # numpy does the layout change and scaling: several times faster than torch ops on small CPU tensors
    chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw) / np.float32(127.5) - np.float32(1.0))


def tensor_to_uint8(image: Tensor) -> np.ndarray:
    """Float tensor [3, H, W] in [-1, 1] -> uint8 array [H, W, 3]; exact inverse of ``pil_to_tensor``."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor of shape [3, H, W], got {tuple(image.shape)}")
    arr = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.ascontiguousarray(np.clip(np.rint((arr + 1.0) * 127.5), 0, 255).astype(np.uint8))


def resize_shorter_side(img: Image.Image, resolution: int) -> Image.Image:
    """Scale so that the shorter side equals ``resolution`` (bicubic; PIL filters antialias when shrinking)."""
    w, h = img.size
    if min(w, h) == resolution:
        return img
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def crop_square(img: Image.Image, resolution: int, crop: str = "center") -> Image.Image:
    """Crop a ``resolution`` square; "random" draws the offset from torch's global RNG.

    torch's global RNG is seeded per DataLoader worker from the loader's generator, so random crops are
    reproducible for a fixed seed and worker count (see ``ImageDataModule``).
    """
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    if crop == "random":
        left = int(torch.randint(0, w - resolution + 1, ()).item())
        top = int(torch.randint(0, h - resolution + 1, ()).item())
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


class ImageTransform:
    """Decoded PIL image -> tensor [3, resolution, resolution] in [-1, 1].

    Steps: RGB conversion (alpha over white), resize shorter side to ``resolution`` (bicubic, antialiased),
    center or random square crop, optional random horizontal flip (p = 0.5).
    """

    def __init__(self, resolution: int, crop: str = "center", flip: bool = False) -> None:
        self.resolution = check_resolution(resolution)
        self.crop = check_choice("crop", crop, CROP_MODES)
        self.flip = bool(flip)

    def __call__(self, img: Image.Image) -> Tensor:
        img = to_rgb(img)
        img = crop_square(resize_shorter_side(img, self.resolution), self.resolution, self.crop)
        if self.flip and bool(torch.rand(()) < 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img)

    def load(self, source: str | os.PathLike | IO[bytes]) -> Tensor:
        """Open an image file (decoded at a reduced size where the format allows, ``open_image``) and transform it."""
        return self(open_image(source, self.resolution))

    def __repr__(self) -> str:
        return f"ImageTransform(resolution={self.resolution}, crop={self.crop!r}, flip={self.flip})"


def open_image(source: str | os.PathLike | IO[bytes], resolution: int | None = None) -> Image.Image:
    """Open and fully decode an image file or binary stream (raises on unreadable or truncated data).

    For JPEGs, ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is much smaller, which
    makes large photos several times cheaper to load; the result stays at least ``resolution`` on each side.
    """
    img = Image.open(source)
    if resolution is not None and img.format == "JPEG":
        img.draft("RGB", (resolution, resolution))
    img.load()
    return img


def make_sample(image: Tensor, caption: str, attributes: str | dict | None, key: str, n_bad: int = 0) -> dict:
    """Build the sample dict every dataset yields (see the module docstring)."""
    if attributes is None:
        attributes = "{}"
    elif not isinstance(attributes, str):
        attributes = json.dumps(attributes, sort_keys=True)
    return {"image": image, "caption": caption, "attributes": attributes, "key": key, "n_bad": int(n_bad)}


def with_label(attributes: str | None, label: int, name: str | None = None) -> str:
    """Attribute JSON text with the class ``label`` (and its ``class_name``) added: where every ldm dataset keeps
    a sample's class (the latent cache and ``text_encoder=class`` read ``attributes["label"]``)."""
    if int(label) < 0:
        raise ValueError(f"class label {label} is negative: labels are class indices 0, 1, 2, ...")
    merged = json.loads(attributes) if attributes else {}
    if not isinstance(merged, dict):
        merged = {"value": merged}
    merged["label"] = int(label)
    if name is not None:
        merged["class_name"] = name
    return json.dumps(merged, sort_keys=True)


class BadDataCounter:
    """Counts items that failed to load, per process (each DataLoader worker keeps its own copy).

    ``failed`` records a failure; ``ok`` records a success and returns how many failures happened since the
    previous success (the sample's ``n_bad``). When ``bad / attempts > max_bad_fraction`` after at least
    ``min_attempts`` attempts, a RuntimeError lists the first bad items and the setting that raises the limit.
    """

    def __init__(self, source: str, max_bad_fraction: float = 0.05, min_attempts: int = 20,
                 setting: str = "max_bad_fraction", max_listed: int = 20, fix: str | None = None) -> None:
        self.source = source
        # how to raise the limit where this dataset is built by something other than a data config
        self.fix = fix or f"raise the dataset argument {setting} (e.g. data.dataset.{setting}=0.2)"
        self.max_bad_fraction = check_fraction("max_bad_fraction", max_bad_fraction, allow_one=True)
        self.min_attempts = min_attempts
        self.setting = setting
        self.max_listed = max_listed
        self.good = 0
        self.bad = 0
        self.pending = 0
        self.bad_items: dict[str, str] = {}

    @property
    def attempts(self) -> int:
        return self.good + self.bad

    def ok(self) -> int:
        self.good += 1
        n, self.pending = self.pending, 0
        return n

    def failed(self, item: str, error: BaseException | str) -> None:
        self.bad += 1
        self.pending += 1
        if item not in self.bad_items and len(self.bad_items) < self.max_listed:
            reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            self.bad_items[item] = reason[:300]
        if self.attempts >= self.min_attempts and self.bad > self.max_bad_fraction * self.attempts:
            self.raise_error(f"{self.bad} of {self.attempts} items failed to load "
                             f"(more than {self.setting}={self.max_bad_fraction})")

    def raise_error(self, headline: str) -> None:
        listed = "\n".join(f"  {name}: {why}" for name, why in self.bad_items.items())
        raise RuntimeError(
            f"{self.source}: {headline}.\nFirst bad items (up to {self.max_listed}):\n{listed}\n"
            f"Fix or remove these files, or {self.fix} to tolerate more bad data."
        )

    def __repr__(self) -> str:
        return f"BadDataCounter(good={self.good}, bad={self.bad}, max_bad_fraction={self.max_bad_fraction})"


def check_index(index: int, n: int, dataset: str) -> int:
    """``index`` of a map-style dataset of length ``n`` in [0, n) (negative counts from the end), else an
    IndexError naming ``dataset``."""
    position = index + n if index < 0 else index
    if not 0 <= position < n:
        raise IndexError(f"index {index} out of range for {dataset} of length {n}")
    return position


class SkipBadFiles:
    """The reading rule of every map-style dataset whose files may be broken (folders, emoji): item ``index``, or
    when it fails to load the next item that loads (walking forward, wrapping around).

    Each failure counts toward ``max_bad_fraction`` (``bad``, a ``BadDataCounter``) and into the returned
    sample's ``n_bad``, once per pass in index order: a bad file a walk from its bad neighbour counted is not
    counted again when its own index is read next (two adjacent bad files are 2 in ``n_bad``, not 3). A file
    that failed is not decoded again in this process.
    """

    def __init__(self, source: str, max_bad_fraction: float = 0.05) -> None:
        self.bad = BadDataCounter(source, max_bad_fraction)
        self._known_bad: dict[str, str] = {}  # name -> why it failed
        self._counted_ahead: set[str] = set()  # bad files a walk counted before their own index was read

    def read(self, index: int, names: Sequence[str], load: Any, what: str) -> tuple[str, Any, int]:
        """``(name, load(name), n_bad)`` of the first of ``names[index:] + names[:index]`` that ``load`` reads;
        a RuntimeError when none does or too many failed (``what``: the items, for the message)."""
        n = len(names)
        for step in range(n):
            name = names[(index + step) % n]
            error = self._known_bad.get(name)
            if error is None:
                try:
                    value = load(name)
                except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
                    error = self._known_bad[name] = f"{type(exc).__name__}: {exc}"
                else:
                    return name, value, self.bad.ok()
            if step == 0 and name in self._counted_ahead:
                self._counted_ahead.discard(name)
            elif step == 0 or name not in self._counted_ahead:
                if step:
                    self._counted_ahead.add(name)
                self.bad.failed(name, error)
        self.bad.raise_error(f"all {n} {what} failed to load")
        raise AssertionError("unreachable")


class FileListDataset(Dataset):
    """Base of the map-style datasets over files that may be broken (image folders, emoji).

    A subclass passes its file ``names`` (fixed order) and defines ``_load(name)``; ``_read(index)`` returns
    ``(name, loaded, n_bad)`` by :class:`SkipBadFiles`' rule, and ``bad`` counts the failures.
    """

    def __init__(self, names: Sequence[str], source: str, what: str, max_bad_fraction: float) -> None:
        self._names = names
        self._what = what  # the items, for the error when none loads
        self._reader = SkipBadFiles(source, max_bad_fraction)
        self.bad = self._reader.bad

    def __len__(self) -> int:
        return len(self._names)

    def _read(self, index: int) -> tuple[str, Any, int]:
        index = check_index(index, len(self._names), type(self).__name__)
        return self._reader.read(index, self._names, self._load, self._what)

    def _load(self, name: str) -> Any:
        raise NotImplementedError
