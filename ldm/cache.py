"""Latent cache: encode a dataset once with a frozen stage-1 autoencoder and write webdataset shards.

    python -m ldm.cache autoencoder.pretrained=outputs/autoencoder/<run>/checkpoints/last.ckpt out_dir=data/latents/shapes32
    torchrun --nproc_per_node 8 -m ldm.cache autoencoder.pretrained=... out_dir=... data=webdataset data.dataset.urls=...

Stage 2 never runs the encoder: it samples z ~ q(z|x) from the stored posterior mean/log-variance and normalises
it with the stored statistics (``ldm/data/latents.py``), as EDM2 does; the cached posterior makes the cost of the
encoder a one-off (Rombach et al. 2022, Sec. 3: the first stage is trained once and reused).

This module loads the models, encodes and runs the ranks; the layout of ``out_dir`` (manifest, shards and their
sidecars), the work plan and the resume checks are in ``ldm/data/latent_writer.py``, the sample format in
``ldm/data/latent_format.py``. Shard k of the run (train shards first, then val) is written by rank k % world, so
a restarted run, with any number of ranks, writes only the shards that are missing or incomplete.
Every split is cached in its canonical view: datasets that take ``crop``/``flip``/``shuffle_buffer``/
``epoch_size`` get center crops, no flips, no shuffling and a single pass.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

import ldm
from ldm.checkpoint import (
    PIXEL_SPACE,
    build_autoencoder,
    read_stage1_checkpoint,
    source_missing,
    with_latent_stats,
)
from ldm.cli import check_arguments, user_errors
from ldm.data.common import check_resolution
from ldm.data.datamodules import canonical_dataset
from ldm.data.latent_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    CLASSES_NAME,
    MANIFEST_NAME,
    autoencoder_identity,
)
from ldm.data.latent_writer import (
    ShardUnit,
    ShardWriter,
    UnitStream,
    class_index,
    clean_cache_dir,
    finished_shard,
    plan_units,
    read_json,
    settings_problems,
    sidecar_path,
    split_entry,
    write_json,
)
from ldm.distributed import barrier, init_distributed
from ldm.runtime import autocast_dtype, resolve_device, storage_dtype

log = logging.getLogger("ldm.cache")
STORAGE_DTYPES = ("float16", "float32")
# precision "auto" is fp32 here (autocast_dtype(..., half_on_auto=False)): cuDNN already runs fp32 convolutions as
# TF32 on Ampere+ GPUs (fp16's 10-bit mantissa, fp32's range); bf16/fp16 autocast are faster but round activations
# to 8/11 bits and fp16 can overflow.

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


def _encode_units(job: _Job, datasets: dict[str, Any], units: list[ShardUnit], batch_size: int, num_workers: int,
                  show: bool, on_shard_done: Callable[[str], None] | None) -> None:
    loader = DataLoader(UnitStream(datasets, units, batch_size), batch_size=None, num_workers=num_workers,
                        pin_memory=job.device.type == "cuda")
    total = None if any(u.url for u in units) else sum(u.stop - u.start for u in units)
    bar = tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True,
               desc=f"encoding (rank {job.rank} of {job.world})")
    writers: dict[ShardUnit, ShardWriter] = {}
    started, images = time.perf_counter(), 0
    try:
        with torch.inference_mode():
            for item in loader:
                unit = item["unit"]
                if unit not in writers:
                    writers[unit] = ShardWriter(job.out_dir / unit.name, unit.index)
                writer = writers[unit]
                if item["images"] is not None:
                    writer.write(_encode_batch(job, item["images"], item["meta"], unit.name), item["meta"])
                    images += len(item["meta"])
                    bar.update(len(item["meta"]))
                if item["last"]:
                    del writers[unit]
                    size = writer.finish()
                    write_json(sidecar_path(job.out_dir / unit.name), {
                        "name": unit.name, "num_samples": writer.count, "bytes": size, "source": unit.source,
                        "settings": job.settings[unit.split], "n_bad": writer.n_bad, "labels": bool(writer.classes),
                        "classes": writer.classes,
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
        precision: "auto"/"fp32", "bf16" or "fp16" autocast for the encoders (``ldm.runtime.autocast_dtype``).
        max_images: cache at most this many images per split (map-style sources).
        overwrite: replace a cache in ``out_dir`` made with other settings (else that is an error).
        on_shard_done: called with the shard name after each shard is complete (progress hooks, tests).
    Under torchrun (WORLD_SIZE > 1) the default process group is initialised here if needed (nccl on CUDA, gloo
    on CPU) and left initialised: Lightning reuses an existing group, and torch cannot re-initialise one after
    destroying it under the same torchrun rendezvous. Ranks share ``out_dir`` (a shared filesystem across
    nodes); every rank returns the manifest dict.
    """
    stored = storage_dtype(dtype, "dtype", STORAGE_DTYPES, " (bfloat16 keeps 3 fewer mantissa bits than float16 "
                           "and latents fit float16's range)")
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
    if not ckpt["ldm"].get("latent_stats"):
        raise ValueError(f"the autoencoder of {ckpt_path or 'the given checkpoint'} comes without latent statistics "
                         "(an imported one): pass with_latent_stats(ckpt, data_module) instead of the path")
    device = resolve_device(device or "auto")
    autocast = autocast_dtype(precision, device, half_on_auto=False)
    rank, world = init_distributed(device)  # the env:// rendezvous of torchrun; a no-op in one process
    out_dir = Path(out_dir)
    # one process at a time per folder (sweep jobs started together); the ranks of one job meet at barriers
    with _exclusive_build(out_dir) if rank == 0 else nullcontext():

        model, stats = build_autoencoder(ckpt)
        model = model.requires_grad_(False).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        identity = autoencoder_identity(model)
        text_id = None
        if text_encoder is not None:
            text_encoder = text_encoder.to(device).eval()
            text_id = json.loads(json.dumps(text_encoder.identity()))  # as it reads back from JSON
        datasets = {split: canonical_dataset(data_module, split) for split in splits}
        plans = {split: plan_units(split, ds, shard_size, max_images) for split, ds in datasets.items()}
        # image side from the first sample (map-style) or the shard reader's transform (webdataset)
        first = datasets[splits[0]]
        side = first.transform.resolution if isinstance(first, IterableDataset) else int(first[0]["image"].shape[-1])
        with torch.inference_mode():
            latent_shape = list(model.encode(torch.zeros(1, 3, side, side, device=device)).mean.shape[1:])
        settings = {split: {"autoencoder": identity, "dtype": dtype, "latent_shape": latent_shape,
                            "text_encoder": text_id, "source": repr(ds),
                            "shard_size": None if isinstance(ds, IterableDataset) else shard_size}
                    for split, ds in datasets.items()}

        problems = [] if overwrite else settings_problems(out_dir, settings, identity, dtype, latent_shape, text_id)
        if problems:
            raise ValueError(f"{out_dir} holds a latent cache made with other settings:\n  - " + "\n  - ".join(problems)
                             + "\nPass overwrite=true to replace it, or choose another out_dir.")
        previous = None if overwrite else read_json(out_dir / MANIFEST_NAME)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            clean_cache_dir(out_dir, splits, {s: len(p) for s, p in plans.items()}, everything=overwrite)
            for split in splits:
                (out_dir / split).mkdir(exist_ok=True)
        barrier()

        job = _Job(model, text_encoder, device, autocast, channels_last, stored,
                   latent_shape, out_dir, settings, rank, world)
        units = [u for split in splits for u in plans[split]]
        mine = [u for k, u in enumerate(units) if k % world == rank]
        pending = [u for u in mine if finished_shard(out_dir, u, settings[u.split], full=True) is None]
        log.info("rank %d/%d: %d of its %d shards to write (%d already done) -> %s", rank, world, len(pending),
                 len(mine), len(mine) - len(pending), out_dir)
        if pending:
            _encode_units(job, datasets, pending, batch_size or data_module.batch_size,
                          data_module.num_workers if num_workers is None else num_workers, progress and rank == 0,
                          on_shard_done)
        barrier()

        if rank == 0:
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            manifest = {
                "format": CACHE_FORMAT, "version": CACHE_VERSION, "ldm_version": ldm.__version__,
                "created": (previous or {}).get("created") or now, "updated": now,
                "autoencoder": {"ckpt_path": None if ckpt_path in (None, PIXEL_SPACE) else str(Path(ckpt_path).resolve()),
                                "identity": identity, "config": ckpt["ldm"]["config"].get("autoencoder")},
                "latent_stats": stats, "latent_shape": latent_shape, "dtype": dtype, "resolution": side,
                "precision": precision, "shard_size": shard_size, "world_size": world,
                "dataset": getattr(data_module, "describe", data_module.__repr__)(),
                "splits": {split: split_entry(out_dir, plans[split], settings[split]) for split in splits},
            }
            # splits cached into this folder earlier with the same settings (checked above) stay listed
            for split, entry in (previous or {}).get("splits", {}).items():
                manifest["splits"].setdefault(split, entry)
            labels = any(v.get("labels") for v in manifest["splits"].values())
            if labels:  # the class index: every label of the cache, its name where the data gives one, counts per split
                manifest["classes"] = class_index(manifest["splits"])
                write_json(out_dir / CLASSES_NAME, manifest["classes"])
            context = next((v["context_shape"] for v in manifest["splits"].values() if v.get("context_shape")), None)
            manifest["text_encoder"] = None if text_id is None else {"identity": text_id, "context_shape": context}
            manifest["fields"] = ["mean", "logvar", "caption", "attributes", "key"] + ["label"] * labels + (
                ["context", "context_mask"] if text_id is not None else [])
            write_json(out_dir / MANIFEST_NAME, manifest)
            log.info("latent cache %s: %s", out_dir, ", ".join(f"{s} {v['num_samples']} samples in {len(v['shards'])} "
                                                                "shards" for s, v in manifest["splits"].items()))
            for split, entry in manifest["splits"].items():
                if entry.get("n_bad"):  # unreadable images, broken members or labels: skipped, never cached
                    log.warning("latent cache %s: %d %s sample(s) could not be read and were skipped (n_bad in "
                                "manifest.json; the dataset's warnings name them)", out_dir, entry["n_bad"], split)
        barrier()
        return json.loads((out_dir / MANIFEST_NAME).read_text())


@contextmanager
def _exclusive_build(out_dir: Path):
    """Hold ``out_dir/.build.lock`` while building. Jobs of a sweep started together on the same (default) cache
    folder then take turns: the first builds it, the others wait and find every shard done, instead of deleting
    each other's unfinished shards. (``flock``: one host, or a file system that supports it.)"""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the latent cache %s: waiting for it to finish", out_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------- Hydra entry

def run(cfg: DictConfig) -> dict[str, Any]:
    """Compose the objects ``build_cache`` takes from the ``cache`` config and call it."""
    from ldm.export import pretrained_source

    source = pretrained_source(cfg, "autoencoder.pretrained")
    if source is None:
        raise ValueError("no autoencoder: pass autoencoder.pretrained=<stage-1 checkpoint, e.g. outputs/autoencoder/"
                         "<run>/checkpoints/last.ckpt, or a pretrained autoencoder>")
    if source_missing(source):
        raise FileNotFoundError(f"autoencoder.pretrained={source} does not exist")
    if cfg.resolution is not None:
        check_resolution(cfg.resolution)  # before reading the checkpoint
    ckpt = read_stage1_checkpoint(source, preset=cfg.autoencoder_preset)
    if cfg.resolution is None:  # the autoencoder's training resolution, unless the user sets one
        with open_dict(cfg):
            cfg.resolution = int(ckpt["ldm"]["config"]["resolution"])
    check_resolution(int(cfg.resolution),
                     factor=2 ** (len(ckpt["ldm"]["config"]["autoencoder"].get("ch_mult", [1])) - 1))
    data = hydra.utils.instantiate(cfg.data)
    ckpt = with_latent_stats(ckpt, data, int(cfg.latent_stats_images), resolve_device(cfg.device), int(cfg.seed),
                             cfg.autoencoder_latent_scale)
    text_encoder = hydra.utils.instantiate(cfg.text_encoder) if cfg.get("text_encoder") is not None else None
    return build_cache(
        ckpt, data, cfg.out_dir, splits=list(cfg.splits), dtype=cfg.dtype, shard_size=cfg.shard_size,
        text_encoder=text_encoder, device=cfg.device, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        precision=cfg.precision, channels_last=cfg.channels_last, max_images=cfg.max_images,
        overwrite=cfg.overwrite, progress=cfg.progress, ckpt_path=source,
    )


@hydra.main(version_base="1.3", config_path="../configs", config_name="cache")
@user_errors("python -m ldm.cache")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    check_arguments("cache", "python -m ldm.cache")
    main()
