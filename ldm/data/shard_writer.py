"""Writing webdataset shards: ``write_shards`` (samples -> tar shards, each renamed into place when complete),
the image encoder and the atomic file hooks the latent cache's writer uses too. ``python -m ldm.data.shards``
is the command that writes a dataset with it; ``ldm.data.shards`` reads shards.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable

import numpy as np
import webdataset as wds
from PIL import Image
from torch import Tensor

from ldm.data.common import check_choice, tensor_to_uint8

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Tensor | np.ndarray | Image.Image, image_format: str = "png", quality: int = 95) -> bytes:
    """Encode a tensor [3, H, W] in [-1, 1], a uint8 array [H, W, 3] or a PIL image as png/jpg/webp bytes."""
    fmt = IMAGE_FORMATS[check_choice("image_format", image_format, tuple(IMAGE_FORMATS))]
    if isinstance(image, Tensor):
        image = tensor_to_uint8(image)
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
    buf = io.BytesIO()
    options = {"compress_level": 6} if fmt == "PNG" else {"quality": quality}
    pil.save(buf, format=fmt, **options)
    return buf.getvalue()


class AtomicFiles:
    """ShardWriter opener/post hooks: write ``<name>.tmp-<pid>``, rename to ``<name>`` once complete."""

    def __init__(self) -> None:
        self.open_files: dict[str, tuple[str, io.BufferedWriter]] = {}
        self.done: list[str] = []

    def open(self, fname: str) -> io.BufferedWriter:
        os.makedirs(os.path.dirname(os.path.abspath(fname)), exist_ok=True)
        tmp = f"{fname}.tmp-{os.getpid()}"
        fh = open(tmp, "wb")  # noqa: SIM115 - closed in publish/abort
        self.open_files[fname] = (tmp, fh)
        return fh

    def publish(self, fname: str) -> None:
        tmp, fh = self.open_files.pop(fname)
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(tmp, fname)  # atomic on POSIX: readers never see a half-written shard
        self.done.append(fname)

    def abort(self) -> None:
        for tmp, fh in self.open_files.values():
            fh.close()
            os.remove(tmp)
        self.open_files.clear()


def write_shards(samples: Iterable[dict], pattern: str, maxcount: int = 1000, image_format: str = "png",
                 maxsize: float = 3e9) -> list[str]:
    """Write samples ({"image", "caption", "attributes", "key"}) to tar shards named ``pattern % i``.

    image -> ``<key>.<image_format>`` (png is lossless; tensors in [-1, 1] round-trip exactly), caption ->
    ``<key>.txt``, attributes (JSON text or dict) -> ``<key>.json``. Keys are made tar-safe and unique. Each
    shard is written under a temporary name and renamed when complete, so a crash leaves no partial shard.
    Returns the shard paths written.
    """
    try:
        if pattern % 0 == pattern % 1:
            raise TypeError
    except TypeError:
        raise ValueError(f"pattern {pattern!r} needs one printf field for the shard number, "
                         "e.g. data/shapes/shard-%06d.tar") from None
    check_choice("image_format", image_format, tuple(IMAGE_FORMATS))
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    files = AtomicFiles()
    writer = None
    seen: set[str] = set()
    try:
        for i, sample in enumerate(samples):
            if writer is None:
                writer = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0,
                                         opener=files.open, post=files.publish, encoder=False, mtime=0.0)
            # Dots split a webdataset key from its extension, so keep keys to [A-Za-z0-9_/-].
            key = re.sub(r"[^A-Za-z0-9_/-]", "_", str(sample.get("key", ""))).strip("/")
            if not key or key in seen:
                key = f"{i:09d}"
            seen.add(key)
            attributes = sample.get("attributes") or "{}"
            if not isinstance(attributes, str):
                attributes = json.dumps(attributes, sort_keys=True)
            writer.write({
                "__key__": key,
                image_format: encode_image(sample["image"], image_format),
                "txt": str(sample.get("caption", "")).encode("utf-8"),
                "json": attributes.encode("utf-8"),
            })
        if writer is None:
            raise ValueError(f"no samples to write to {pattern!r}")
        writer.close()
    except BaseException:
        if writer is not None and writer.tarstream is not None:
            try:  # finish the tar stream into the temporary file so it does not flush later, then delete it
                writer.tarstream.close()
            except Exception:
                pass
        files.abort()
        raise
    return files.done
