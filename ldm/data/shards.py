"""WebDataset shards: a streaming reader (``WebDatasetImages``) and the command that writes a dataset to shards
(``python -m ldm.data.shards``, with ``ldm.data.shard_writer.write_shards``).

A shard is a tar file whose members are grouped by key: ``<key>.png|jpg|jpeg|webp`` (the image),
``<key>.txt`` (the caption), ``<key>.json`` (attributes; its "caption" field is used when there is no
.txt; a "label" field is the sample's class) and ``<key>.cls`` (the class label as decimal text, webdataset's
convention: it becomes the attributes' "label"). Shards are split across ranks first and then across DataLoader
workers (as webdataset's
``split_by_node`` / ``split_by_worker``: rank r reads shards r, r + W, r + 2W, ... where W is the world size,
taken from RANK/WORLD_SIZE or from torch.distributed once it is initialised, else from where the dataset was
built, so that "spawn"-started workers split correctly too). Write at least
``ranks x workers`` shards so that no worker idles.

    python -m ldm.data.shards --source shapes --split train --n 1000 --resolution 64 \\
        --out data/shapes/shard-%06d.tar --maxcount 1000
"""

from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset

from ldm.data.common import (
    BadDataCounter,
    ImageTransform,
    check_choice,
    check_resolution,
    make_sample,
    stable_hash,
    with_label,
)
from ldm.data.shard_writer import IMAGE_FORMATS, write_shards
from ldm.data.tarcheck import scan_tar_cached

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # pipe:, http:, s3:, gs:, ... (not a Windows drive "C:")


def expand_shard_urls(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    """Expand brace patterns (``shard-{000000..000099}.tar``), "::"-joined lists, folders (their ``*.tar``)
    and globs into a list of shard URLs.

    Local files must exist: otherwise FileNotFoundError lists the missing paths and the pattern they came
    from. Remote URLs (``pipe:``, ``http(s):``, ``s3:``...) are passed through unchecked.
    """
    items = [os.fspath(urls)] if isinstance(urls, (str, os.PathLike)) else [os.fspath(u) for u in urls]
    found: list[str] = []
    missing: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(item):
            if _REMOTE.match(url) and not url.startswith("file:"):
                found.append(url)
                continue
            path = os.path.expanduser(url[len("file:"):] if url.startswith("file:") else url)
            if os.path.isdir(path):
                path = os.path.join(path, "*.tar")
            if any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                found.extend(matches)
                if not matches:
                    missing.append(path)
            elif os.path.isfile(path):
                found.append(path)
            else:
                missing.append(path)
    if missing:
        shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise FileNotFoundError(
            f"{len(missing)} shard path(s) from {urls!r} do not exist (cwd {os.getcwd()}):\n  {shown}\n"
            "Check the path and brace range (e.g. data/shapes/shard-{000000..000009}.tar) or write shards "
            "with `python -m ldm.data.shards --source shapes --out data/shapes/shard-%06d.tar`."
        )
    if not found:
        raise ValueError(f"no shards given: {urls!r}")
    return found


class WebDatasetImages(IterableDataset):
    """Streams samples from webdataset shards (see the module docstring for the shard layout).

    Args:
        urls: shards of the train split: brace pattern, folder, glob or list.
        split: "train", "val" or "test"; val reads ``val_urls``, test reads ``test_urls`` (else ``val_urls``).
        resolution, crop, flip: as ``ImageTransform`` (shorter side resize, center/random crop, flip);
            random crops and flips apply to the train split only.
        shuffle_buffer: sample shuffle buffer of the train split (shards are shuffled too); 0 disables.
        epoch_size: samples per rank per epoch for the train split (shards are re-read as often as needed),
            so ``len()`` works for Lightning; None = one pass over this rank's shards, no ``len()``.
        seed: shuffling seed; each epoch and worker derives its own seed from it and the DataLoader's seed.
        max_bad_fraction: raise when more than this share of members fail to decode (after 20 attempts).

    Yields dicts: image FloatTensor [3, resolution, resolution] in [-1, 1], caption, attributes (JSON text),
    key (the sample's key in its shard), n_bad (broken members / tar errors skipped before this sample).
    """

    def __init__(self, urls: str | Sequence[str], split: str = "train", val_urls: str | Sequence[str] | None = None,
                 test_urls: str | Sequence[str] | None = None, resolution: int = 256, crop: str = "center",
                 flip: bool = False, shuffle_buffer: int = 1000, epoch_size: int | None = None, seed: int = 0,
                 max_bad_fraction: float = 0.05) -> None:
        super().__init__()
        self.split = check_choice("split", split, ("train", "val", "test"))
        check_resolution(resolution)  # before expanding the shard list: a typo'd setting is named first
        source = {"train": urls, "val": val_urls, "test": test_urls if test_urls is not None else val_urls}[split]
        if source is None:
            raise ValueError(f"WebDatasetImages has no shards for split {split!r}: pass val_urls=... "
                             "(and optionally test_urls=...)")
        self.urls = expand_shard_urls(source)
        self.source = source if isinstance(source, str) else f"{len(self.urls)} shards"
        self.training = split == "train"
        # Augmentation and shuffling are for training only: evaluation sees the same pixels every epoch.
        self.transform = ImageTransform(resolution, crop if self.training else "center", flip and self.training)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if epoch_size is not None and epoch_size < 1:
            raise ValueError(f"epoch_size must be a positive number of samples per rank or None, got {epoch_size}")
        self.shuffle_buffer = shuffle_buffer if self.training else 0
        self.epoch_size = epoch_size if self.training else None
        self.seed = int(seed)
        self.bad = BadDataCounter(f"WebDatasetImages({self.source!r})", max_bad_fraction)
        self._whole_keys: dict[str, frozenset[str]] = {}  # truncated local shard -> keys of its whole samples
        # Rank seen where the dataset is built (Lightning builds it after init_process_group). A DataLoader
        # worker started with "spawn" has no process group, so __iter__ falls back to these values there.
        self._built_rank, self._built_world = wds.utils.pytorch_worker_info()[:2]
        # set by the train loader before each pass (ldm.data.resumable.ResumableDataLoader); None: every pass of
        # this copy counts as a new epoch
        self.epoch: int | None = None
        self._passes = 0

    def __len__(self) -> int:
        if self.epoch_size is None:
            raise TypeError("WebDatasetImages has no length unless epoch_size is set (train split)")
        return self.epoch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rank_and_world(self) -> tuple[int, int]:
        """(rank, world size) from RANK/WORLD_SIZE or torch.distributed (as webdataset's split_by_node)."""
        rank, world = wds.utils.pytorch_worker_info()[:2]
        return (rank, world) if world > 1 else (self._built_rank, self._built_world)

    def __iter__(self) -> Iterator[dict]:
        rank, world = self.rank_and_world()
        _, _, worker, n_workers = wds.utils.pytorch_worker_info()
        rank_shards = len(self.urls[rank::world])
        if rank_shards == 0:
            raise ValueError(f"{len(self.urls)} shard(s) cannot be split across {world} ranks; write at least "
                             f"{world} shards (use a smaller --maxcount)")
        # The same number of active workers on every rank (not this rank's own shard count): with equal
        # per-worker quotas every rank then yields the same number of batches, which DDP needs (else a rank
        # with fewer shards finishes early and the others hang in their next all-reduce).
        active = min(n_workers, len(self.urls) // world)
        if worker >= active:
            return
        quota = None
        if self.epoch_size is not None:
            quota = self.epoch_size // active + (worker < self.epoch_size % active)
        # Shard order and buffer shuffle are a pure function of (seed, epoch, rank, worker), so a resumed run
        # re-reads the stream it stopped in. (Random crops/flips draw from the worker's torch RNG, which the train
        # loader seeds from (seed, epoch) too.)
        epoch = self.epoch if self.epoch is not None else self._passes
        self._passes += 1
        base = stable_hash(self.seed, rank, worker, n_workers, epoch)
        produced, passes = 0, 0
        while quota is None or produced < quota:
            got = 0
            for sample in self._one_pass(base + passes, rank, world, worker, active):
                yield sample
                got += 1
                produced += 1
                if quota is not None and produced >= quota:
                    return
            if got == 0:
                if self.bad.bad:
                    self.bad.raise_error(f"no sample of this worker's shards decoded ({self.bad.bad} failures)")
                raise ValueError(f"shards {self.source!r} (rank {rank}, worker {worker}) hold no samples")
            passes += 1
            if quota is None:
                return

    def _one_pass(self, seed: int, rank: int, world: int, worker: int, active: int) -> Iterator[dict]:
        # Same slicing as webdataset's split_by_node / split_by_worker, with rank and active workers resolved
        # above (a worker of a rank with more shards than `active` workers reads several shards).
        def split_by_rank(src: Iterable[dict]) -> Iterator[dict]:
            return itertools.islice(src, rank, None, world)

        def split_by_active_worker(src: Iterable[dict]) -> Iterator[dict]:
            return itertools.islice(src, worker, None, active)

        pipeline = wds.WebDataset(
            self.urls, handler=self.on_error, seed=seed % 2**63, empty_check=False,
            shardshuffle=len(self.urls) if self.training else False,
            nodesplitter=split_by_rank, workersplitter=lambda src: self.check_shards(split_by_active_worker(src)),
        )
        if self.shuffle_buffer > 1:
            pipeline = pipeline.shuffle(self.shuffle_buffer, rng=random.Random(seed + 1))
        for raw in pipeline:
            sample = self.decode(raw)
            if sample is not None:
                yield sample

    def check_shards(self, items: Iterable[dict]) -> Iterator[dict]:
        """webdataset stage before the tar reader: a local shard cut short (``ldm.data.tarcheck``) is named in a
        warning and counted as one bad item before it is read; only its whole samples are then used.

        (tarfile reads a cut tar as a shorter one: without this the samples after the cut vanish silently.)
        Remote shards (pipe:, http:, ...) cannot be checked without downloading them twice.
        """
        for item in items:
            url = item["url"]
            if not _REMOTE.match(url) or url.startswith("file:"):
                scan, first_time = scan_tar_cached(url[len("file:"):] if url.startswith("file:") else url)
                if scan.truncated:
                    self._whole_keys[url] = frozenset(scan.keys)
                    if first_time:
                        log.warning("%s. It is counted as a bad item (n_bad).", scan.describe())
                    self.bad.failed(f"{url} (truncated)", f"{scan.detail}; the shard ended early after "
                                    f"{scan.samples} whole samples")
                else:
                    self._whole_keys.pop(url, None)
            yield item

    def on_error(self, exn: Exception) -> bool:
        """webdataset handler: count the broken tar/member and keep going (``failed`` raises past the limit)."""
        if any(url in str(a) for a in exn.args for url in self._whole_keys):
            return True  # the cut of a truncated shard: counted once for the shard by check_shards
        where = next((a for a in exn.args if isinstance(a, str) and ".tar" in a), "shard")
        self.bad.failed(f"{where} (tar error #{self.bad.bad + 1})", exn)
        return True

    def decode(self, raw: dict) -> dict | None:
        """A raw webdataset sample -> the sample dict this dataset yields, or None (counted in ``self.bad``)."""
        key = str(raw.get("__key__", ""))
        name = f"{raw.get('__url__', '?')}:{key}"
        whole = self._whole_keys.get(raw.get("__url__"))
        if whole is not None and key not in whole:
            return None  # the sample a truncated shard's cut went through: counted once for the shard
        ext = next((e for e in IMAGE_KEYS if e in raw), None)
        if ext is None:
            found = sorted(k for k in raw if not k.startswith("__"))
            self.bad.failed(name, f"no image member (looked for {list(IMAGE_KEYS)}, found {found})")
            return None
        try:
            image = self.transform.load(io.BytesIO(raw[ext]))
            meta = json.loads(raw["json"]) if "json" in raw else {}
            if "txt" in raw:
                caption = raw["txt"].decode("utf-8").strip()
            else:
                caption = str(meta.get("caption", "")) if isinstance(meta, dict) else ""
            attributes = raw["json"].decode("utf-8") if "json" in raw else "{}"
            if "cls" in raw:  # webdataset's class member: the label as decimal text
                attributes = with_label(attributes, int(raw["cls"].decode("utf-8").strip()))
        except Exception as exc:  # broken image bytes, bad UTF-8, JSON or class
            self.bad.failed(name, exc)
            return None
        return make_sample(image, caption, attributes, key, self.bad.ok())

    def __repr__(self) -> str:
        return (f"WebDatasetImages({self.source!r}, split={self.split!r}, shards={len(self.urls)}, "
                f"epoch_size={self.epoch_size}, shuffle_buffer={self.shuffle_buffer}, {self.transform})")


# ------------------------------------------------------------------------------------------------- CLI

def build_source(source: str, split: str, resolution: int, root: str | None, n: int | None, seed: int = 0):
    """The map-style dataset the CLI writes from (center crops, no flips: shards keep the canonical view)."""
    if source == "shapes":
        from ldm.data.shapes import ShapesDataset

        size = n or 10000
        return ShapesDataset(split=split, size=size, val_size=size, resolution=resolution, seed=seed)
    if source == "folder":
        from ldm.data.images import ImageFolderDataset

        if root is None:
            raise SystemExit("--source folder needs --root PATH")
        return ImageFolderDataset(root, split=split, resolution=resolution)
    if source == "emoji":
        from ldm.data.emoji import EmojiDataset

        return EmojiDataset(root=root, split=split, resolution=resolution)
    if source == "fashion_mnist":
        from ldm.data.fashion_mnist import DEFAULT_ROOT, FashionMNISTDataset

        return FashionMNISTDataset(root=root or DEFAULT_ROOT, split=split, resolution=resolution)
    raise SystemExit(f"unknown --source {source!r}")


def main(argv: Sequence[str] | None = None) -> None:
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="python -m ldm.data.shards", description="Write a dataset to webdataset shards.")
    p.add_argument("--source", required=True, choices=["shapes", "folder", "emoji", "fashion_mnist"])
    p.add_argument("--root", default=None, help="data folder (folder: required; emoji/fashion_mnist: optional)")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=int, default=None, help="samples to write (default: all; shapes: 10000)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--out", required=True, help="shard name pattern, e.g. data/shapes/shard-%%06d.tar")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--image-format", default="png", choices=sorted(IMAGE_FORMATS))
    p.add_argument("--seed", type=int, default=0, help="shapes only: scene seed")
    args = p.parse_args(argv)

    dataset = build_source(args.source, args.split, args.resolution, args.root, args.n, args.seed)
    total = len(dataset) if args.n is None else min(args.n, len(dataset))
    stats = {"written": 0, "n_bad": 0}

    def samples() -> Iterator[dict]:
        keys: set[str] = set()
        for i in tqdm(range(total), desc=f"{args.source}/{args.split}", unit="img"):
            sample = dataset[i]
            stats["n_bad"] += sample["n_bad"]
            if sample["key"] in keys:  # a skipped bad file returns the next good one: write it once
                continue
            keys.add(sample["key"])
            stats["written"] += 1
            yield sample

    shards = write_shards(samples(), args.out, maxcount=args.maxcount, image_format=args.image_format)
    print(f"wrote {stats['written']} samples ({stats['n_bad']} bad skipped) to {len(shards)} shard(s): "
          f"{shards[0]} .. {shards[-1]}")


if __name__ == "__main__":
    main()
