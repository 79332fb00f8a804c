"""Images to evaluate and their features: a data split in its evaluation view, image sets given as a folder or
webdataset shards, and feature extraction over them, sliced over ranks and gathered.

Every image reaches a feature extractor as uint8 ``[B, 3, H, W]`` (what a PNG holds); datasets yield floats in
[-1, 1] and ``to_uint8`` is the exact inverse of their decoding (``ldm.data.common.pil_to_tensor``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from ldm.data.common import IMAGE_EXTENSIONS, check_resolution, open_image
from ldm.data.images import ImageFolderDataset
from ldm.data.shards import IMAGE_KEYS, WebDatasetImages, expand_shard_urls
from ldm.distributed import gather_rows, rank_world
from ldm.metrics.fid import FeatureStats, StatsAccumulator, fid_from_stats, inception_score, kid

log = logging.getLogger("ldm.evaluate")


# Evaluation sees every image once, center-cropped, unflipped, in a fixed order (train split included).
def to_uint8(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` floats in [-1, 1] -> uint8 ``[B, 3, H, W]`` (round((x + 1) * 127.5), as saved to PNG)."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _shard_images(path: str) -> Iterator[tuple[str, Any]]:
    """(name, file object) of every member with an image extension, shard by shard, to the end or to a cut."""
    for url in expand_shard_urls(path):
        try:
            with tarfile.open(url, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS:
                        yield f"{url}:{member.name}", io.BytesIO(tar.extractfile(member).read())
        except (tarfile.TarError, OSError):  # a truncated or broken shard: its readable head was looked at
            continue


def _folder_files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            yield p


def _is_shards(path: str) -> bool:
    local = Path(path).expanduser()
    return (any(c in path for c in "{*?[") or "::" in path or path.endswith(".tar")
            or (local.is_dir() and any(local.glob("*.tar"))
                and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in local.iterdir())))


def probe_image_set(path: str | os.PathLike, name: str = "images", shards: bool | None = None) -> int:
    """The shorter side of the first readable image of a folder or of webdataset shards (the default reading
    resolution), skipping files that do not decode. Raises a ValueError naming the set (``name=path``) when it
    holds no readable image at all; other files (captions, JSON, ...) are ignored."""
    path = os.fspath(path)
    local = Path(path).expanduser()
    if not any(c in path for c in "{*?[") and "::" not in path and not local.exists():
        raise FileNotFoundError(f"{name}={path} does not exist (absolute: {local.resolve()}); give a folder of "
                                "images or webdataset shards (a .tar, a brace pattern such as "
                                "data/shards/val-{000000..000003}.tar, or a folder of .tar files)")
    if shards is None:
        shards = _is_shards(path)
    unreadable: list[str] = []
    ignored = 0
    files = _shard_images(path) if shards else ((str(p), p) for p in _folder_files(local))
    for file, source in files:
        if not shards and Path(file).suffix.lower() not in IMAGE_EXTENSIONS:
            ignored += 1
            continue
        try:
            with open_image(source) as img:
                return min(img.size)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            unreadable.append(f"{file} ({type(exc).__name__}: {str(exc)[:80]})")
    where = "shards" if shards else "folder"
    found = (f"{len(unreadable)} file(s) named as images could not be decoded, e.g.\n  "
             + "\n  ".join(unreadable[:5]) + "\n" if unreadable
             else f"no {'member' if shards else 'file'} has an image extension {list(IMAGE_EXTENSIONS)}")
    other = f"{ignored} other file(s) ignored; " if ignored else ""
    raise ValueError(f"{name}={path}: no readable images in this {where}: {found}{other}point {name}= at a "
                     "folder of images (.png, .jpg, ...) or at webdataset shards of images")


def open_image_set(path: str | os.PathLike, resolution: int | None = None, name: str = "images",
                   max_bad_fraction: float = 0.05) -> Dataset:
    """A folder of images (recursive) or webdataset shards (a ``.tar``, brace pattern, glob, or a folder that
    holds only ``*.tar``) as a dataset of center-cropped ``resolution`` squares in [-1, 1].

    ``resolution=None``: the shorter side of the set's first image. ``name`` (e.g. "real") goes into errors.
    Unreadable images are skipped and counted (``n_bad`` of the samples), up to ``max_bad_fraction``.
    """
    path = os.fspath(path)
    local = Path(path).expanduser()
    shards = _is_shards(path)
    side = probe_image_set(path, name, shards)  # a set without one readable image stops here, named
    resolution = check_resolution(side if resolution is None else resolution)
    if shards:
        dataset = WebDatasetImages(path, split="val", val_urls=path, resolution=resolution,
                                   max_bad_fraction=max_bad_fraction)
    else:
        dataset = ImageFolderDataset(local, split="all", resolution=resolution, max_bad_fraction=max_bad_fraction)
    dataset.bad.fix = "raise evaluate.py's max_bad_fraction (e.g. max_bad_fraction=0.2)"
    return dataset


class _Indexed(Dataset):
    """``dataset[indices[i]]`` with its index added (so rows gathered from ranks can be put back in order)."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[self.indices[i]], "index": self.indices[i]}


def iterate_batches(dataset: Dataset, limit: int | None = None, batch_size: int = 16, num_workers: int = 0,
                    desc: str = "images", progress: bool = True) -> Iterator[dict]:
    """This rank's share of the first ``limit`` samples (all when None), in batches.

    Map-style datasets: rank r of W takes indices r, r + W, ...; iterable datasets (webdataset shards) split
    their shards over ranks themselves and index their samples ``local * W + r``. Yields dicts with ``index``
    (list[int]), ``image`` (float ``[B, 3, H, W]`` in [-1, 1]), ``caption``, ``attributes``, ``key`` (lists) and
    ``n_bad`` (unreadable files skipped to produce this batch). A dataset that skips a broken file returns the
    next good one; such repeats (same key) are dropped here.
    """
    rank, world = rank_world()
    if isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        total = None if limit is None else max(0, math.ceil((limit - rank) / world))
    else:
        n = len(dataset) if limit is None else min(limit, len(dataset))
        indices = list(range(rank, n, world))
        loader = DataLoader(_Indexed(dataset, indices), batch_size=batch_size, num_workers=num_workers)
        total = len(indices)
    seen: set[str] = set()
    count = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        for batch in loader:
            size = len(batch["key"])
            index = batch["index"].tolist() if "index" in batch else [(count + i) * world + rank for i in range(size)]
            keep = [i for i in range(size) if batch["key"][i] not in seen and (total is None or count + i < total)]
            seen.update(batch["key"][i] for i in keep)
            count += size
            bar.update(size)
            if keep:
                yield {"index": [index[i] for i in keep], "image": batch["image"][keep],
                       "caption": [batch["caption"][i] for i in keep],
                       "attributes": [batch["attributes"][i] for i in keep], "key": [batch["key"][i] for i in keep],
                       "n_bad": int(batch["n_bad"].sum())}
            if total is not None and count >= total:
                break


@torch.inference_mode()
def extract(extractor: torch.nn.Module, images: Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """uint8 ``[B, 3, H, W]`` -> ``{"features": float32 [B, D], "logits": [B, 1008] (Inception only)}``."""
    out = extractor(images.to(device))
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def finish_rows(rows: dict[str, list], keys: tuple[str, ...] = ("key",)) -> dict[str, Any]:
    """Stack this rank's rows, gather all ranks' (ordered by ``index``; repeated keys dropped) onto every rank.

    ``rows`` maps names to lists of per-batch arrays (concatenated) or per-sample lists (``index``, ``key``).
    """
    local = {k: (np.concatenate(v) if v and isinstance(v[0], np.ndarray) else
                 [x for part in v for x in part] if v and isinstance(v[0], list) else v) for k, v in rows.items()}
    local["n_bad"] = [sum(rows.get("n_bad", []))]
    everything = gather_rows(local)
    order, seen = [], set()
    for i in np.argsort(np.asarray(everything["index"]), kind="stable"):
        key = tuple(everything[k][i] for k in keys)
        if key not in seen:
            seen.add(key)
            order.append(int(i))
    out = {k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in order]) for k, v in everything.items()
           if k != "n_bad"}
    out["n_bad"] = int(sum(everything["n_bad"]))
    return out


def dataset_features(dataset: Dataset, extractor: torch.nn.Module, device: torch.device, limit: int | None = None,
                     batch_size: int = 32, num_workers: int = 0, desc: str = "features",
                     progress: bool = True) -> dict[str, Any]:
    """Features (and Inception logits) of the first ``limit`` images of ``dataset``, computed by every rank on
    its share and gathered: ``{"features": [N, D], "logits"?: [N, 1008], "index", "key", "n_bad"}``."""
    rows: dict[str, list] = {"index": [], "key": [], "n_bad": []}
    for batch in iterate_batches(dataset, limit, batch_size, num_workers, desc, progress):
        for k, v in extract(extractor, to_uint8(batch["image"]), device).items():
            rows.setdefault(k, []).append(v)
        rows["index"].append(batch["index"])
        rows["key"].append(batch["key"])
        rows["n_bad"].append(batch["n_bad"])
    if "features" not in rows:  # this rank got no images (more ranks than images): gather empty rows
        rows["features"] = [np.zeros((0, extractor.dim), np.float32)]
        if str(getattr(extractor, "name", "")).startswith("inception"):
            rows["logits"] = [np.zeros((0, 1008), np.float32)]
    out = finish_rows(rows)
    if len(out["features"]) == 0:
        raise ValueError(f"{desc}: no images could be read from {dataset!r}")
    return out


def to_stats(features: dict[str, Any], extractor: torch.nn.Module, meta: dict[str, Any]) -> FeatureStats:
    """``FeatureStats`` (mean, float64 covariance, count, features and logits kept) of gathered features."""
    logits = features.get("logits")
    acc = StatsAccumulator(features["features"].shape[1], keep_features=True, keep_logits=logits is not None)
    out = {"features": torch.from_numpy(features["features"])}
    if logits is not None:
        out["logits"] = torch.from_numpy(logits)
    acc.update(out)
    return acc.result(extractor.identity(), meta)


def feature_metrics(real: FeatureStats, fake: FeatureStats, seed: int = 0, kid_subsets: int = 100) -> dict[str, Any]:
    """FID and KID (mean ± std over subsets of 1,000) of ``fake`` against ``real``; Inception Score when ``fake``
    has Inception logits. Keys as ``ldm.metrics.results`` expects: ``fid``, ``kid``, ``is``. With 1,000 images or
    fewer per set every subset is the whole set: KID is computed once and its std is None (there is no spread)."""
    metrics: dict[str, Any] = {"fid": fid_from_stats(real, fake)}
    if real.features is not None and fake.features is not None:
        size = min(1000, len(real.features), len(fake.features))
        whole = size == len(real.features) == len(fake.features)
        k_mean, k_std = kid(real.features, fake.features, subsets=1 if whole else kid_subsets, subset_size=size,
                            seed=seed)
        metrics["kid"] = {"mean": float(k_mean), "std": None if whole else float(k_std)}
    if fake.logits is not None:
        is_mean, is_std = inception_score(fake.logits, splits=min(10, len(fake.logits)))
        metrics["is"] = {"mean": float(is_mean), "std": float(is_std)}
    return metrics


def evaluate_image_sets(real: str | os.PathLike, fake: str | os.PathLike, extractor: torch.nn.Module,
                        device: torch.device, *, resolution: int | None = None, limit: int | None = None,
                        batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                        progress: bool = True, max_bad_fraction: float = 0.05) -> dict[str, Any]:
    """FID and KID (and IS of ``fake`` with Inception) between two image sets, no checkpoint involved.

    ``real``/``fake``: folders of images or webdataset shards (see ``open_image_set``); ``real`` may also be a
    reference-statistics ``.npz`` (``FeatureStats.save``; KID needs its stored features). ``limit``: at most
    this many images per set. Unreadable images (and the samples lost to a truncated shard) are skipped, counted
    in ``n_bad`` and named in a warning, up to ``max_bad_fraction`` of a set. Returns the partial results dict of ``ldm.metrics.results`` (metrics, n_images,
    timing, extractor, data); every rank gets it.
    """
    started = time.perf_counter()
    sets: dict[str, FeatureStats] = {}
    bad = 0
    for name, path in (("real", real), ("fake", fake)):
        if name == "real" and str(path).endswith(".npz"):
            if not Path(path).is_file():
                raise FileNotFoundError(f"real={path} does not exist")
            sets[name] = FeatureStats.load(path)
            if sets[name].extractor.get("name") != extractor.identity().get("name"):
                raise ValueError(f"real={path} holds {sets[name].extractor.get('name')} statistics but "
                                 f"extractor={extractor.identity().get('name')}; use the same extractor")
            if sets[name].features is None:
                log.warning("real=%s stores no per-image features, so only FID is computed (KID needs them): "
                            "point real= at the image set, or at statistics saved with their features", path)
            continue
        dataset = open_image_set(path, resolution, name, max_bad_fraction)
        feats = dataset_features(dataset, extractor, device, limit, batch_size, num_workers, f"{name} features",
                                 progress)
        if feats["n_bad"]:
            log.warning("%s=%s: %d unreadable item(s) skipped (counted in n_bad): %s", name, path, feats["n_bad"],
                        "; ".join(f"{k}: {v}" for k, v in list(dataset.bad.bad_items.items())[:5])
                        if num_workers == 0 else "num_workers=0 lists them")
        bad += feats["n_bad"]
        sets[name] = to_stats(feats, extractor, {"path": str(path), "description": repr(dataset)})
    seconds = time.perf_counter() - started
    n = sets["fake"].count
    return {"task": "fid", "metrics": feature_metrics(sets["real"], sets["fake"], seed=seed),
            "n_images": n, "n_real": sets["real"].count, "n_bad": bad, "extractor": extractor.identity(),
            "data": {"name": "image sets", "description": f"real={real} fake={fake}"},
            "timing": {"seconds": round(seconds, 3),
                       "seconds_per_1000_images": round(1000 * seconds / max(n + sets["real"].count, 1), 3)}}
