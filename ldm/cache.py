"""Latent cache: encode a dataset once with a frozen stage-1 autoencoder and write webdataset shards.

    python -m ldm.cache ckpt=outputs/autoencoder/<run>/checkpoints/last.ckpt out_dir=data/latents/shapes32
    torchrun --nproc_per_node 8 -m ldm.cache ckpt=... out_dir=... data=webdataset data.dataset.urls=...

Stage 2 never runs the encoder: it samples z ~ q(z|x) from the stored posterior mean/log-variance and normalises
it with the stored statistics (``ldm/data/latents.py``), as EDM2 does; the cached posterior makes the cost of the
encoder a one-off (Rombach et al. 2022, Sec. 3: the first stage is trained once and reused).

Layout of ``out_dir``:
    manifest.json                   written last, by rank 0, once every shard of every split exists
    <split>/shard-NNNNNN.tar        samples (format: ``ldm/data/latents.py``), tar key "<shard>_<position>"
    <split>/shard-NNNNNN.json       sidecar: sample count, bytes, source range, settings; marks the shard done
Work: a map-style dataset's shard i holds dataset indices [i*S, (i+1)*S) (S = ``shard_size``, up to
``max_images`` per split); a webdataset source (``WebDatasetImages``) is cached input shard j -> output shard j.
Shard k of the run (train shards first, then val) is written by rank k % world, so a restarted run, with any
number of ranks, skips the shards whose sidecar, size and member count check out, rewrites the others, and
deletes temporary files. Each tar is written to ``<name>.tmp-<pid>`` and renamed when complete.
Every split is cached in its canonical view: datasets that take ``crop``/``flip``/``shuffle_buffer``/
``epoch_size`` get center crops, no flips, no shuffling and a single pass.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

import ldm
from ldm.checkpoint import build_autoencoder, load_checkpoint
from ldm.data.latents import (
    CACHE_FORMAT,
    CACHE_VERSION,
    MANIFEST_NAME,
    autoencoder_identity,
    encode_array,
)
from ldm.data.shards import _AtomicFiles

log = logging.getLogger("ldm.cache")
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# "auto" is fp32: cuDNN already runs fp32 convolutions as TF32 on Ampere+ GPUs (fp16's 10-bit mantissa, fp32's
# range); bf16/fp16 autocast are faster but round activations to 8/11 bits and fp16 can overflow.
PRECISIONS = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CANONICAL_VIEW = {"crop": "center", "flip": False, "shuffle_buffer": 0, "epoch_size": None}


@dataclass(frozen=True)
class _Unit:
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


# ------------------------------------------------------------------------------------------ loading

def read_stage1_checkpoint(ckpt: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Load a stage-1 checkpoint and check that it is one and holds latent statistics."""
    where = "the given checkpoint" if isinstance(ckpt, Mapping) else str(ckpt)
    if not isinstance(ckpt, Mapping):
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"ckpt={ckpt} does not exist; give a stage-1 checkpoint, e.g. "
                                    "outputs/autoencoder/<run>/checkpoints/last.ckpt (written by python train.py)")
        ckpt = load_checkpoint(ckpt)
    stage = ckpt["ldm"].get("stage")
    if stage != "autoencoder":
        raise ValueError(f"{where} is a {stage!r} checkpoint; the latent cache needs a stage-1 (autoencoder) "
                         "checkpoint, e.g. outputs/autoencoder/<run>/checkpoints/last.ckpt")
    if not ckpt["ldm"].get("latent_stats"):
        raise ValueError(f"{where} has no latent statistics (ckpt['ldm']['latent_stats']). train.py stores them "
                         "when stage-1 training finishes: finish the run (resume=auto), or add them with "
                         "ldm.checkpoint.add_latent_stats(path, image_batches, n_images)")
    return dict(ckpt)


def cache_dataset(data_module: Any, split: str):
    """The split's dataset in its canonical view (center crop, no flip, no shuffling, one pass)."""
    factory = getattr(data_module, "dataset_factory", None)
    if factory is None:
        return data_module.dataset(split)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    return factory(split=split, **{k: v for k, v in _CANONICAL_VIEW.items() if k in params})


def _plan(split: str, ds: Any, shard_size: int, max_images: int | None) -> list[_Unit]:
    if isinstance(ds, IterableDataset):
        if not (hasattr(ds, "urls") and hasattr(ds, "_decode")):
            raise ValueError(f"cannot cache {ds!r}: an iterable dataset that is not WebDatasetImages has no "
                             "resumable order; use a map-style dataset or data=webdataset")
        if max_images is not None:
            raise ValueError("max_images needs a map-style dataset; for webdataset sources list fewer shards "
                             "in data.dataset.urls / val_urls")
        return [_Unit(split, i, url=url) for i, url in enumerate(ds.urls)]
    n = len(ds) if max_images is None else min(len(ds), int(max_images))
    if n < 1:
        raise ValueError(f"the {split!r} split has no images to cache ({ds!r}, max_images={max_images})")
    return [_Unit(split, i, i * shard_size, min((i + 1) * shard_size, n)) for i in range(math.ceil(n / shard_size))]


# ------------------------------------------------------------------------------------ reading images

def _all(src):
    return src


def _unit_samples(ds: Any, unit: _Unit) -> Iterator[dict]:
    if unit.url is None:
        for i in range(unit.start, unit.stop):
            yield ds[i]
        return
    # One input shard, in order, decoded by its WebDatasetImages (transform, bad-data accounting); no rank or
    # worker splitting there: whole input shards are assigned to ranks and workers here.
    pipeline = wds.WebDataset([unit.url], shardshuffle=False, empty_check=False, handler=ds._on_error,
                              nodesplitter=_all, workersplitter=_all)
    for raw in pipeline:
        sample = ds._decode(raw)
        if sample is not None:
            yield sample


def _meta(sample: Mapping[str, Any]) -> dict[str, Any]:
    attributes = sample.get("attributes") or "{}"
    attributes = attributes if isinstance(attributes, str) else json.dumps(attributes, sort_keys=True)
    meta = {"caption": str(sample.get("caption", "")), "attributes": attributes, "key": str(sample.get("key", "")),
            "n_bad": int(sample.get("n_bad", 0))}
    label = sample.get("label")
    if label is None:  # class datasets (fashion_mnist) keep their class in the attributes
        try:
            label = json.loads(attributes).get("label")
        except (ValueError, AttributeError):
            label = None
    if isinstance(label, (int, np.integer)) or (isinstance(label, Tensor) and label.numel() == 1):
        meta["label"] = int(label)
    return meta


class _UnitStream(IterableDataset):
    """Image batches that never cross shards, plus an end marker per shard; worker w takes units w, w+n, ..."""

    def __init__(self, datasets: dict[str, Any], units: list[_Unit], batch_size: int) -> None:
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
    def _pack(unit: _Unit, batch: list[dict], last: bool) -> dict:
        images = torch.stack([s["image"] for s in batch]) if batch else None
        return {"unit": unit, "last": last, "images": images, "meta": [_meta(s) for s in batch]}


# ------------------------------------------------------------------------------------------- writing

class _ShardWriter:
    """One output tar, written to a temporary name and renamed on ``finish`` (``ldm.data.shards``' helper)."""

    def __init__(self, path: Path, index: int) -> None:
        self.path, self.index = path, index
        self.files = _AtomicFiles()
        self.tar = wds.TarWriter(self.files.open(str(path)), encoder=False, mtime=0.0)
        self.count = self.n_bad = 0
        self.labels = False
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
            self.labels = self.labels or "label" in m
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


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tar_keys(path: Path) -> set[str]:
    with tarfile.open(path) as tar:  # headers only: members' data is skipped by seeking
        return {name.split("/")[-1].split(".", 1)[0] for name in tar.getnames()}


def _finished(out_dir: Path, unit: _Unit, settings: dict, full: bool) -> dict | None:
    """The sidecar of ``unit`` if the shard is complete and made with ``settings``, else None."""
    tar = out_dir / unit.name
    try:
        info = json.loads(_sidecar(tar).read_text())
        ok = info["settings"] == settings and info["source"] == unit.source and tar.stat().st_size == info["bytes"]
        return info if ok and (not full or len(_tar_keys(tar)) == info["num_samples"]) else None
    except (OSError, ValueError, KeyError):
        return None


def _settings_problems(out_dir: Path, splits: dict[str, dict], identity: str, dtype: str,
                       latent_shape: list[int], text_id: dict | None) -> list[str]:
    """Where an existing cache in ``out_dir`` (its manifest, or shards of an unfinished run) differs from this run."""
    problems = []
    old = _read_json(out_dir / MANIFEST_NAME)
    if isinstance(old, dict):
        ae = old.get("autoencoder") or {}
        was = {"autoencoder": ae.get("identity"), "dtype": old.get("dtype"), "latent_shape": old.get("latent_shape"),
               "text_encoder": (old.get("text_encoder") or {}).get("identity")}
        now = {"autoencoder": identity, "dtype": dtype, "latent_shape": latent_shape, "text_encoder": text_id}
        problems += [f"{MANIFEST_NAME}: {k} {was[k]} (from {ae.get('ckpt_path')}) vs {now[k]} now"
                     for k in now if was[k] != now[k]]
    for split, settings in splits.items():
        for side in sorted((out_dir / split).glob("shard-*.json")):
            old = (_read_json(side) or {}).get("settings")
            if not isinstance(old, dict):
                continue
            diff = [f"{k} {old.get(k)} vs {v} now" for k, v in settings.items() if old.get(k) != v]
            if diff:
                problems.append(f"{side.relative_to(out_dir)}: " + "; ".join(diff))
                break
    return problems


def _clean(out_dir: Path, splits: Sequence[str], keep: dict[str, int], everything: bool) -> None:
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


# ----------------------------------------------------------------------------------------- encoding

@dataclass
class _Job:
    """What every rank needs to encode and write its shards."""

    model: nn.Module
    text_encoder: nn.Module | None
    device: torch.device
    autocast: torch.dtype | None
    channels_last: bool
    dtype: torch.dtype
    latent_shape: list[int]
    out_dir: Path
    settings: dict[str, dict]  # per split, stored in every sidecar
    rank: int = 0
    world: int = 1


def _encode_batch(job: _Job, images: Tensor, meta: list[dict], where: str) -> dict[str, np.ndarray]:
    """Images [B, 3, H, W] in [-1, 1] -> numpy mean/logvar [B, C, h, w] (+ context [B, L, D], mask [B, L])."""
    x = images.to(job.device, non_blocking=True)
    if job.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(job.device.type, dtype=job.autocast) if job.autocast is not None else nullcontext():
        posterior = job.model.encode(x)
        out = {"mean": posterior.mean, "logvar": posterior.logvar}
        if job.text_encoder is not None:
            key = getattr(job.text_encoder, "input_key", "caption")
            if key == "label" and any("label" not in m for m in meta):
                raise ValueError(f"{where}: the condition encoder reads labels but the dataset's samples have none")
            inputs = ([m["caption"] for m in meta] if key == "caption"
                      else torch.tensor([m["label"] for m in meta], device=job.device))
            out["context"], out["context_mask"] = job.text_encoder(inputs)
    if list(out["mean"].shape[1:]) != job.latent_shape:
        raise ValueError(f"{where}: latents of shape {list(out['mean'].shape[1:])}, expected {job.latent_shape}: "
                         "all images of a cache must have the same size")
    arrays = {}
    for k, v in out.items():
        v = v.to(torch.bool) if k == "context_mask" else v.float().to(job.dtype)
        if k != "context_mask" and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}: non-finite {k} after casting to {job.dtype} (values beyond float16's "
                             "+-65504 overflow): use dtype=float32, and precision=fp32 if autocast was on")
        arrays[k] = v.cpu().numpy()
    return arrays


def _encode_units(job: _Job, datasets: dict[str, Any], units: list[_Unit], batch_size: int, num_workers: int,
                  show: bool, on_shard_done: Callable[[str], None] | None) -> None:
    loader = DataLoader(_UnitStream(datasets, units, batch_size), batch_size=None, num_workers=num_workers,
                        pin_memory=job.device.type == "cuda")
    total = None if any(u.url for u in units) else sum(u.stop - u.start for u in units)
    bar = tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True,
               desc=f"encoding (rank {job.rank} of {job.world})")
    writers: dict[_Unit, _ShardWriter] = {}
    started, images = time.perf_counter(), 0
    try:
        with torch.inference_mode():
            for item in loader:
                unit = item["unit"]
                if unit not in writers:
                    writers[unit] = _ShardWriter(job.out_dir / unit.name, unit.index)
                writer = writers[unit]
                if item["images"] is not None:
                    writer.write(_encode_batch(job, item["images"], item["meta"], unit.name), item["meta"])
                    images += len(item["meta"])
                    bar.update(len(item["meta"]))
                if item["last"]:
                    del writers[unit]
                    size = writer.finish()
                    _write_json(_sidecar(job.out_dir / unit.name), {
                        "name": unit.name, "num_samples": writer.count, "bytes": size, "source": unit.source,
                        "settings": job.settings[unit.split], "n_bad": writer.n_bad, "labels": writer.labels,
                        "context_shape": writer.context_shape, "rank": job.rank, "world_size": job.world,
                        "seconds": round(time.perf_counter() - writer.started, 3)})
                    bar.set_postfix(shard=unit.name)
                    if on_shard_done is not None:
                        on_shard_done(unit.name)
    finally:
        for writer in writers.values():
            writer.abort()
        bar.close()
    seconds = time.perf_counter() - started
    log.info("rank %d: encoded %d images into %d shards in %.1f s (%.1f images/s)", job.rank, images, len(units),
             seconds, images / max(seconds, 1e-9))


def _resolve_device(device: str | torch.device | None) -> torch.device:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or str(device) == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return torch.device("cuda", local) if device.type == "cuda" and device.index is None else device


def _barrier(device: torch.device) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(device_ids=[device.index]) if dist.get_backend() == "nccl" else dist.barrier()


# ------------------------------------------------------------------------------------------- the run

def build_cache(
    autoencoder_ckpt: str | os.PathLike | Mapping[str, Any],
    data_module: Any,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "val"),
    dtype: str = "float16",
    shard_size: int = 1000,
    text_encoder: nn.Module | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    precision: str = "auto",
    channels_last: bool = False,
    max_images: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    ckpt_path: str | os.PathLike | None = None,
    on_shard_done: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Encode ``splits`` of ``data_module`` with the checkpoint's frozen autoencoder into ``out_dir``.

    Args:
        autoencoder_ckpt: a stage-1 checkpoint path, or the loaded checkpoint dict (then give ``ckpt_path``).
        data_module: an ``ImageDataModule`` (its dataset factory is rebuilt in the canonical view, see the module
            docstring) or any object with ``dataset(split)``, ``batch_size`` and ``num_workers``.
        dtype: storage dtype of mean/logvar (and text embeddings): "float16" or "float32".
        shard_size: images per shard (map-style sources; webdataset sources keep their input shards).
        text_encoder: a frozen condition encoder (``encoder(captions) -> (context [B,L,D], mask [B,L])``) whose
            outputs are cached too; moved to ``device``. A trainable encoder is refused.
        device: "auto" = cuda:LOCAL_RANK when CUDA is available, else cpu.
        batch_size, num_workers: default to the data module's.
        precision: "auto"/"fp32", "bf16" or "fp16" autocast for the encoders (see ``PRECISIONS``).
        max_images: cache at most this many images per split (map-style sources).
        overwrite: replace a cache in ``out_dir`` made with other settings (else that is an error).
        on_shard_done: called with the shard name after each shard is complete (progress hooks, tests).
    Under torchrun (WORLD_SIZE > 1) the default process group is initialised here if needed (nccl on CUDA, gloo
    on CPU) and left initialised: Lightning reuses an existing group, and torch cannot re-initialise one after
    destroying it under the same torchrun rendezvous. Ranks share ``out_dir`` (a shared filesystem across
    nodes); every rank returns the manifest dict.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {list(STORAGE_DTYPES)} (bfloat16 keeps "
                         "3 fewer mantissa bits than float16 and latents fit float16's range)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {list(PRECISIONS)}")
    if shard_size < 1 or (max_images is not None and max_images < 1):
        raise ValueError(f"need shard_size >= 1 and max_images >= 1 or None, got {shard_size}, {max_images}")
    splits = list(splits)
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits={splits} must name each split to cache once, e.g. [train, val]")
    if text_encoder is not None and getattr(text_encoder, "trainable", False):
        raise ValueError(f"{type(text_encoder).__name__} is trainable: its embeddings change while the U-Net "
                         "trains and cannot be cached. Cache without a text encoder (text_encoder=null); stage 2 "
                         "runs it on the captions")
    if ckpt_path is None and not isinstance(autoencoder_ckpt, Mapping):
        ckpt_path = autoencoder_ckpt
    ckpt = read_stage1_checkpoint(autoencoder_ckpt)
    device = _resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env:// rendezvous of torchrun
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    out_dir = Path(out_dir)

    model, stats = build_autoencoder(ckpt)
    model = model.requires_grad_(False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    identity = autoencoder_identity(model)
    text_id = None
    if text_encoder is not None:
        text_encoder = text_encoder.to(device).eval()
        text_id = json.loads(json.dumps(text_encoder.identity()))  # as it reads back from JSON
    datasets = {split: cache_dataset(data_module, split) for split in splits}
    plans = {split: _plan(split, ds, shard_size, max_images) for split, ds in datasets.items()}
    # image side from the first sample (map-style) or the shard reader's transform (webdataset)
    first = datasets[splits[0]]
    side = first.transform.resolution if isinstance(first, IterableDataset) else int(first[0]["image"].shape[-1])
    with torch.inference_mode():
        latent_shape = list(model.encode(torch.zeros(1, 3, side, side, device=device)).mean.shape[1:])
    settings = {split: {"autoencoder": identity, "dtype": dtype, "latent_shape": latent_shape,
                        "text_encoder": text_id, "source": repr(ds),
                        "shard_size": None if isinstance(ds, IterableDataset) else shard_size}
                for split, ds in datasets.items()}

    problems = [] if overwrite else _settings_problems(out_dir, settings, identity, dtype, latent_shape, text_id)
    if problems:
        raise ValueError(f"{out_dir} holds a latent cache made with other settings:\n  - " + "\n  - ".join(problems)
                         + "\nPass overwrite=true to replace it, or choose another out_dir.")
    previous = None if overwrite else _read_json(out_dir / MANIFEST_NAME)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clean(out_dir, splits, {s: len(p) for s, p in plans.items()}, everything=overwrite)
        for split in splits:
            (out_dir / split).mkdir(exist_ok=True)
    _barrier(device)

    job = _Job(model, text_encoder, device, PRECISIONS[precision], channels_last, STORAGE_DTYPES[dtype],
               latent_shape, out_dir, settings, rank, world)
    units = [u for split in splits for u in plans[split]]
    mine = [u for k, u in enumerate(units) if k % world == rank]
    pending = [u for u in mine if _finished(out_dir, u, settings[u.split], full=True) is None]
    log.info("rank %d/%d: %d of its %d shards to write (%d already done) -> %s", rank, world, len(pending),
             len(mine), len(mine) - len(pending), out_dir)
    if pending:
        _encode_units(job, datasets, pending, batch_size or data_module.batch_size,
                      data_module.num_workers if num_workers is None else num_workers, progress and rank == 0,
                      on_shard_done)
    _barrier(device)

    if rank == 0:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "ldm_version": ldm.__version__,
            "created": (previous or {}).get("created") or now, "updated": now,
            "autoencoder": {"ckpt_path": None if ckpt_path is None else str(Path(ckpt_path).resolve()),
                            "identity": identity, "config": ckpt["ldm"]["config"].get("autoencoder")},
            "latent_stats": stats, "latent_shape": latent_shape, "dtype": dtype, "resolution": side,
            "precision": precision, "shard_size": shard_size, "world_size": world,
            "dataset": getattr(data_module, "describe", data_module.__repr__)(),
            "splits": {split: _split_entry(out_dir, plans[split], settings[split]) for split in splits},
        }
        # splits cached into this folder earlier with the same settings (checked above) stay listed
        for split, entry in (previous or {}).get("splits", {}).items():
            manifest["splits"].setdefault(split, entry)
        labels = any(v.get("labels") for v in manifest["splits"].values())
        context = next((v["context_shape"] for v in manifest["splits"].values() if v.get("context_shape")), None)
        manifest["text_encoder"] = None if text_id is None else {"identity": text_id, "context_shape": context}
        manifest["fields"] = ["mean", "logvar", "caption", "attributes", "key"] + ["label"] * labels + (
            ["context", "context_mask"] if text_id is not None else [])
        _write_json(out_dir / MANIFEST_NAME, manifest)
        log.info("latent cache %s: %s", out_dir, ", ".join(f"{s} {v['num_samples']} samples in {len(v['shards'])} "
                                                            "shards" for s, v in manifest["splits"].items()))
    _barrier(device)
    return json.loads((out_dir / MANIFEST_NAME).read_text())


def _split_entry(out_dir: Path, plan: list[_Unit], settings: dict) -> dict[str, Any]:
    infos = []
    for unit in plan:
        info = _finished(out_dir, unit, settings, full=False)
        if info is None:
            raise RuntimeError(f"shard {unit.name} is missing or incomplete after all ranks finished; rerun the "
                               "same command to resume")
        infos.append(info)
    return {"num_samples": sum(i["num_samples"] for i in infos), "source": settings["source"],
            "n_bad": sum(i["n_bad"] for i in infos), "labels": any(i["labels"] for i in infos),
            "context_shape": next((i["context_shape"] for i in infos if i["context_shape"]), None),
            "shards": [{"name": i["name"], "num_samples": i["num_samples"], "bytes": i["bytes"]}
                       for i in infos if i["num_samples"] > 0]}


# --------------------------------------------------------------------------------------- Hydra entry

def run(cfg: DictConfig) -> dict[str, Any]:
    """Compose the objects ``build_cache`` takes from the ``cache`` config and call it."""
    ckpt = read_stage1_checkpoint(cfg.ckpt)
    if cfg.resolution is None:  # the autoencoder's training resolution, unless the user sets one
        with open_dict(cfg):
            cfg.resolution = int(ckpt["ldm"]["config"]["resolution"])
    data = hydra.utils.instantiate(cfg.data)
    text_encoder = hydra.utils.instantiate(cfg.text_encoder) if cfg.get("text_encoder") is not None else None
    return build_cache(
        ckpt, data, cfg.out_dir, splits=list(cfg.splits), dtype=cfg.dtype, shard_size=cfg.shard_size,
        text_encoder=text_encoder, device=cfg.device, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        precision=cfg.precision, channels_last=cfg.channels_last, max_images=cfg.max_images,
        overwrite=cfg.overwrite, progress=cfg.progress, ckpt_path=cfg.ckpt,
    )


@hydra.main(version_base="1.3", config_path="../configs", config_name="cache")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
