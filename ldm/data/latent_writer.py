"""Writing a latent cache's shards so that an interrupted or re-ranked run resumes (used by ``ldm/cache.py``).

Layout of ``out_dir``:
    manifest.json                   written last, by rank 0, once every shard of every split exists
    <split>/shard-NNNNNN.tar        samples (format: ``ldm/data/latent_format.py``), tar key "<shard>_<position>"
    <split>/shard-NNNNNN.json       sidecar: sample count, bytes, source range, settings; marks the shard done
Work (:func:`plan_units`): a map-style dataset's shard i holds dataset indices [i*S, (i+1)*S) (S = ``shard_size``,
up to ``max_images`` per split); a webdataset source (``WebDatasetImages``) is cached input shard j -> output shard
j. A restarted run skips the shards whose sidecar, size and member count check out (:func:`finished_shard`),
rewrites the others, and deletes temporary files (:func:`clean_cache_dir`). Each tar is written to
``<name>.tmp-<pid>`` and renamed when complete (:class:`ShardWriter`); sidecars and the manifest are written to a
temporary name and renamed too (:func:`write_json`).
"""

from __future__ import annotations

import json
import math
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from ldm.atomic import atomic_write_text
from ldm.data.latent_format import MANIFEST_NAME, encode_array
from ldm.data.shard_writer import AtomicFiles

# --------------------------------------------------------------------------------------------- work units

@dataclass(frozen=True)
class ShardUnit:
    """One output shard: dataset indices [start, stop) or one input webdataset shard ``url``."""

    split: str
    index: int
    start: int = 0
    stop: int = 0
    url: str | None = None

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"

    @property
    def source(self) -> str:
        return self.url if self.url is not None else f"indices [{self.start}, {self.stop})"


def plan_units(split: str, ds: Any, shard_size: int, max_images: int | None) -> list[ShardUnit]:
    """The output shards of ``split``: ``shard_size`` indices each (map-style ``ds``, at most ``max_images``), or
    one per input shard of a ``WebDatasetImages``."""
    if isinstance(ds, IterableDataset):
        if not (hasattr(ds, "urls") and hasattr(ds, "decode")):
            raise ValueError(f"cannot cache {ds!r}: an iterable dataset that is not WebDatasetImages has no "
                             "resumable order; use a map-style dataset or data=webdataset")
        if max_images is not None:
            raise ValueError("max_images needs a map-style dataset; for webdataset sources list fewer shards "
                             "in data.dataset.urls / val_urls")
        return [ShardUnit(split, i, url=url) for i, url in enumerate(ds.urls)]
    n = len(ds) if max_images is None else min(len(ds), int(max_images))
    if n < 1:
        raise ValueError(f"the {split!r} split has no images to cache ({ds!r}, max_images={max_images})")
    return [ShardUnit(split, i, i * shard_size, min((i + 1) * shard_size, n))
            for i in range(math.ceil(n / shard_size))]


# ------------------------------------------------------------------------------------ reading images

def _all(src):
    return src


def _unit_samples(ds: Any, unit: ShardUnit) -> Iterator[dict]:
    if unit.url is None:
        for i in range(unit.start, unit.stop):
            yield ds[i]
        return
    # One input shard, in order, decoded by its WebDatasetImages (transform, bad-data accounting); no rank or
    # worker splitting there: whole input shards are assigned to ranks and workers here.
    pipeline = wds.WebDataset([unit.url], shardshuffle=False, empty_check=False, handler=ds.on_error,
                              nodesplitter=_all, workersplitter=_all)
    for raw in pipeline:
        sample = ds.decode(raw)
        if sample is not None:
            yield sample


def _meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    attributes = sample.get("attributes") or "{}"
    attributes = attributes if isinstance(attributes, str) else json.dumps(attributes, sort_keys=True)
    meta = {"caption": str(sample.get("caption", "")), "attributes": attributes, "key": str(sample.get("key", "")),
            "n_bad": int(sample.get("n_bad", 0))}
    try:  # labelled datasets keep the class in the attributes (ldm.data.common.with_label)
        parsed = json.loads(attributes)
        parsed = parsed if isinstance(parsed, dict) else {}
    except ValueError:
        parsed = {}
    label = sample.get("label", parsed.get("label"))
    if isinstance(label, (int, np.integer)) or (isinstance(label, Tensor) and label.numel() == 1):
        meta["label"] = int(label)
        if isinstance(parsed.get("class_name"), str):
            meta["class_name"] = parsed["class_name"]
    return meta


class UnitStream(IterableDataset):
    """Image batches that never cross shards, plus an end marker per shard; worker w takes units w, w+n, ..."""

    def __init__(self, datasets: dict[str, Any], units: list[ShardUnit], batch_size: int) -> None:
        self.datasets, self.units, self.batch_size = datasets, units, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        units = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in units:
            seen: set[str] = set()
            batch: list[dict] = []
            for sample in _unit_samples(self.datasets[unit.split], unit):
                if sample.get("key") in seen:  # a dataset that skips a broken file returns the next good one
                    continue
                seen.add(sample.get("key"))
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self._pack(unit, batch, False)
                    batch = []
            yield self._pack(unit, batch, True)

    @staticmethod
    def _pack(unit: ShardUnit, batch: list[dict], last: bool) -> dict:
        images = torch.stack([s["image"] for s in batch]) if batch else None
        return {"unit": unit, "last": last, "images": images, "meta": [_meta(s) for s in batch]}


# ------------------------------------------------------------------------------------------- writing

class ShardWriter:
    """One output tar, written to a temporary name and renamed on ``finish`` (``ldm.data.shard_writer``' helper)."""

    def __init__(self, path: Path, index: int) -> None:
        self.path, self.index = path, index
        self.files = AtomicFiles()
        self.tar = wds.TarWriter(self.files.open(str(path)), encoder=False, mtime=0.0)
        self.count = self.n_bad = 0
        self.classes: dict[str, dict[str, Any]] = {}  # label -> {"name", "count"} of this shard
        self.context_shape: list[int] | None = None
        self.started = time.perf_counter()

    def write(self, arrays: dict[str, np.ndarray], meta: list[dict]) -> None:
        for i, m in enumerate(meta):
            record = {k: m[k] for k in ("caption", "attributes", "key", "label") if k in m}
            sample = {"__key__": f"{self.index:06d}_{self.count:06d}", "json": json.dumps(record).encode()}
            sample.update({f"{k}.npy": encode_array(v[i]) for k, v in arrays.items()})
            self.tar.write(sample)
            self.count += 1
            self.n_bad += m["n_bad"]
            if "label" in m:
                entry = self.classes.setdefault(str(m["label"]), {"name": None, "count": 0})
                entry["count"] += 1
                entry["name"] = entry["name"] or m.get("class_name")
        if "context" in arrays:
            self.context_shape = list(arrays["context"].shape[1:])

    def finish(self) -> int:
        self.tar.close()
        self.files.publish(str(self.path))
        return self.path.stat().st_size

    def abort(self) -> None:
        try:
            self.tar.tarstream.close()
        except Exception:
            pass
        self.files.abort()


# ----------------------------------------------------------------------------------- sidecars & resume

def sidecar_path(path: Path) -> Path:
    """``shard-NNNNNN.json`` beside ``shard-NNNNNN.tar``: written once the tar is complete."""
    return path.with_suffix(".json")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to a temporary name and rename it over ``path`` (readers see all or none)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tar_keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:  # headers only: members' data is skipped by seeking
        return {name.split("/")[-1].split(".", 1)[0] for name in tar.getnames()}


def finished_shard(out_dir: Path, unit: ShardUnit, settings: dict, full: bool) -> dict | None:
    """The sidecar of ``unit`` if the shard is complete and made with ``settings``, else None."""
    tar = out_dir / unit.name
    try:
        info = json.loads(sidecar_path(tar).read_text())
        ok = info["settings"] == settings and info["source"] == unit.source and tar.stat().st_size == info["bytes"]
        return info if ok and (not full or len(_tar_keys(tar)) == info["num_samples"]) else None
    except (OSError, ValueError, KeyError):
        return None


def settings_problems(out_dir: Path, splits: dict[str, dict], identity: str, dtype: str,
                      latent_shape: list[int], text_id: dict | None) -> list[str]:
    """Where an existing cache in ``out_dir`` (its manifest, or shards of an unfinished run) differs from this run."""
    problems = []
    old = read_json(out_dir / MANIFEST_NAME)
    if isinstance(old, dict):
        ae = old.get("autoencoder") or {}
        was = {"autoencoder": ae.get("identity"), "dtype": old.get("dtype"), "latent_shape": old.get("latent_shape"),
               "text_encoder": (old.get("text_encoder") or {}).get("identity")}
        now = {"autoencoder": identity, "dtype": dtype, "latent_shape": latent_shape, "text_encoder": text_id}
        problems += [f"{MANIFEST_NAME}: {k} {was[k]} (from {ae.get('ckpt_path')}) vs {now[k]} now"
                     for k in now if was[k] != now[k]]
    for split, settings in splits.items():
        for side in sorted((out_dir / split).glob("shard-*.json")):
            old = (read_json(side) or {}).get("settings")
            if not isinstance(old, dict):
                continue
            diff = [f"{k} {old.get(k)} vs {v} now" for k, v in settings.items() if old.get(k) != v]
            if diff:
                problems.append(f"{side.relative_to(out_dir)}: " + "; ".join(diff))
                break
    return problems


def clean_cache_dir(out_dir: Path, splits: Sequence[str], keep: dict[str, int], everything: bool) -> None:
    """Delete temporary files, shards beyond this run's plan, or (``everything``) all shards and the manifest."""
    if everything:
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for split in splits:
        for path in (out_dir / split).glob("shard-*"):
            stem = path.name.split(".", 1)[0]
            stale = ".tmp-" in path.name or not stem[6:].isdigit() or int(stem[6:]) >= keep.get(split, 0)
            if everything or stale:
                path.unlink(missing_ok=True)
    for tmp in out_dir.glob(f"{MANIFEST_NAME}.tmp-*"):
        tmp.unlink(missing_ok=True)


def merge_classes(parts: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{label: {"name", "count"}}`` of several shards (or splits) as one, counts added, labels in order."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for label, entry in part.items():
            merged = out.setdefault(str(label), {"name": None, "count": 0})
            merged["count"] += int(entry.get("count", 0))
            merged["name"] = merged["name"] or entry.get("name")
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def class_index(splits: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A labelled cache's ``classes.json``: ``{"num_classes": largest label + 1, "classes": {label: {"name":
    class name or None, <split>: images}}}`` from the splits' manifest entries."""
    classes: dict[str, dict[str, Any]] = {}
    for split, entry in splits.items():
        for label, counted in (entry.get("classes") or {}).items():
            merged = classes.setdefault(str(label), {"name": None})
            merged["name"] = merged["name"] or counted.get("name")
            merged[split] = int(counted.get("count", 0))
    labels = sorted(classes, key=int)
    return {"num_classes": int(labels[-1]) + 1 if labels else 0, "classes": {k: classes[k] for k in labels}}


def split_entry(out_dir: Path, plan: list[ShardUnit], settings: dict) -> dict[str, Any]:
    """The manifest entry of one split from its shards' sidecars; raises if a shard of ``plan`` is not done."""
    infos = []
    for unit in plan:
        info = finished_shard(out_dir, unit, settings, full=False)
        if info is None:
            raise RuntimeError(f"shard {unit.name} is missing or incomplete after all ranks finished; rerun the "
                               "same command to resume")
        infos.append(info)
    return {"num_samples": sum(i["num_samples"] for i in infos), "source": settings["source"],
            "n_bad": sum(i["n_bad"] for i in infos), "labels": any(i["labels"] for i in infos),
            "classes": merge_classes(i.get("classes") or {} for i in infos),
            "context_shape": next((i["context_shape"] for i in infos if i["context_shape"]), None),
            "shards": [{"name": i["name"], "num_samples": i["num_samples"], "bytes": i["bytes"]}
                       for i in infos if i["num_samples"] > 0]}
