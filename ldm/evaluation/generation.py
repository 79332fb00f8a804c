"""Stage-2 evaluation: generate one image per caption of an evaluation split (every rank a share, saved as it
goes, resumable), then FID / KID (and IS with Inception) against cached reference statistics of the split's
real images, and, for ``shapes``, the text-alignment score (``ldm.metrics.alignment``).

Layout of ``out_dir``:
    generation.json      what decides the images: checkpoint sha256, sampler, steps, guidance, seed, batch size,
                         precision. A rerun into the same folder with other settings or prompts is refused.
    prompts.jsonl        {"index", "prompt", "key"} per image, in order
    images/NNNNNN.png    image i, for prompt i; written under a temporary name and renamed, so existing = done
    samples.png          the first 64 images, 8 per row, for a look
Work: prompts are cut into chunks of ``batch_size``; chunk k uses a generator seeded by (seed, k) and is made by
rank k % world, so the images do not depend on the number of ranks, and a rerun generates only the chunks with
missing PNGs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, IterableDataset
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from ldm.atomic import atomic_write, atomic_write_text
from ldm.data.common import stable_hash
from ldm.data.images import ImageFolderDataset
from ldm.distributed import barrier, broadcast_object, check_on_rank0, gather_values, rank_world
from ldm.evaluation.imagesets import (
    dataset_features,
    feature_metrics,
    finish_rows,
    iterate_batches,
    to_stats,
    to_uint8,
)
from ldm.metrics.alignment import alignment_score
from ldm.metrics.fid import FeatureStats, cached_reference_stats
from ldm.models.text_encoders import no_labels_error
from ldm.pipeline import LatentDiffusion, generate

log = logging.getLogger("ldm.evaluate")
SETTINGS_NAME = "generation.json"
PROMPTS_NAME = "prompts.jsonl"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 16 MiB blocks (identifies the checkpoint the images came from); of a folder
    (a diffusers export), over its files' relative names and contents in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def image_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / "images" / f"{index:06d}.png"


def save_png(image: torch.Tensor, path: Path) -> None:
    """uint8 ``[3, H, W]`` -> PNG at ``path``, via a temporary file and a rename (never half-written)."""
    atomic_write(path, lambda tmp: Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))


def read_prompts(dataset: Dataset, n: int, field: str = "caption", batch_size: int = 64,
                 num_workers: int = 0) -> list[dict[str, Any]]:
    """``[{"index", "prompt", "key"}]`` for the first ``n`` samples of ``dataset`` (cycled when it is shorter).

    Every rank reads its share (``iterate_batches``) and all get the whole list. ``field``: "caption", or
    "label" for class-conditional models (the ``label`` in the sample's attributes JSON).
    """
    def value(caption: str, attributes: str) -> Any:
        if field == "caption":
            return str(caption)
        label = json.loads(attributes or "{}").get("label")
        if label is None:
            raise ValueError(f"evaluating {dataset!r}: {no_labels_error()}")
        return int(label)

    rows: dict[str, list] = {"index": [], "key": [], "prompt": [], "n_bad": []}
    for batch in iterate_batches(dataset, n, batch_size, num_workers, "prompts", progress=False):
        rows["index"].append(batch["index"])
        rows["key"].append(batch["key"])
        rows["prompt"].append([value(c, a) for c, a in zip(batch["caption"], batch["attributes"], strict=True)])
    found = finish_rows(rows)
    if not found["prompt"]:
        raise ValueError(f"no samples in {dataset!r} to take prompts from")
    m = len(found["prompt"])
    if m < n:
        log.warning("the evaluation split has %d samples; its prompts repeat to make %d images", m, n)
    return [{"index": i, "prompt": found["prompt"][i % m], "key": found["key"][i % m]} for i in range(n)]


def _prepare(out_dir: Path, settings: dict[str, Any], prompts: list[dict], overwrite: bool) -> str | None:
    """Rank 0: check or write generation.json and prompts.jsonl; returns a problem message or None.

    Images already in ``out_dir`` are kept only when they were made with the same settings and the same prompt
    at every index both runs have (a run with more or fewer images extends or reuses the folder).
    """
    settings_path, prompts_path = out_dir / SETTINGS_NAME, out_dir / PROMPTS_NAME
    if settings_path.is_file() and not overwrite:
        old = json.loads(settings_path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
        if prompts_path.is_file():
            old_prompts = [json.loads(line) for line in prompts_path.read_text().splitlines() if line.strip()]
            moved = [i for i, (a, b) in enumerate(zip(old_prompts, prompts, strict=False)) if a["prompt"] != b["prompt"]]
            if moved:
                diff.append(f"prompts: #{moved[0]} was {old_prompts[moved[0]]['prompt']!r}, now "
                            f"{prompts[moved[0]]['prompt']!r} ({len(moved)} differ; other data or split)")
        if diff:
            return (f"{out_dir} holds images generated with other settings:\n  - " + "\n  - ".join(diff) +
                    "\nChoose another out_dir, or pass overwrite=true to delete its images and start again.")
    if overwrite and (out_dir / "images").exists():
        shutil.rmtree(out_dir / "images")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for tmp in (out_dir / "images").glob(".*.tmp"):  # left by a run that was killed
        tmp.unlink(missing_ok=True)
    lines = "".join(json.dumps(p) + "\n" for p in prompts)
    atomic_write_text(prompts_path, lines)
    atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    return None


def generate_images(model: LatentDiffusion, prompts: list[Any], out_dir: str | os.PathLike, *, sampler: str,
                    steps: int, cfg_scale: float, seed: int, sampler_options: dict | None = None,
                    batch_size: int = 16, autocast_dtype: torch.dtype | None = None,
                    progress: bool = True) -> tuple[int, float]:
    """Write ``out_dir/images/NNNNNN.png`` for every prompt whose PNG is missing; returns (images generated,
    seconds). This rank makes chunks k = rank, rank + world, ... (see the module docstring)."""
    rank, world = rank_world()
    device = next(model.unet.parameters()).device
    n = len(prompts)
    chunks = [range(k * batch_size, min(n, (k + 1) * batch_size)) for k in range(math.ceil(n / batch_size))]
    todo = [k for k in range(rank, len(chunks), world) if any(not image_path(out_dir, i).is_file() for i in chunks[k])]
    total = sum(len(chunks[k]) for k in todo)
    log.info("rank %d/%d: %d of its chunks to generate (%d images); the others exist", rank, world, len(todo), total)
    started = time.perf_counter()
    with tqdm(total=total, desc=f"generating (rank {rank} of {world})", unit="img", disable=not progress or rank != 0,
              dynamic_ncols=True) as bar:
        for k in todo:
            generator = torch.Generator(device=device).manual_seed(stable_hash("ldm.evaluate", seed, k) % 2**63)
            images = generate(model, [prompts[i] for i in chunks[k]], sampler=sampler, steps=steps,
                              cfg_scale=cfg_scale, generator=generator, sampler_options=sampler_options,
                              batch_size=batch_size, autocast_dtype=autocast_dtype)
            for i, image in zip(chunks[k], to_uint8(images).cpu(), strict=True):
                if not image_path(out_dir, i).is_file():
                    save_png(image, image_path(out_dir, i))
            bar.update(len(chunks[k]))
    return total, time.perf_counter() - started


def reference_stats(path: Path, meta: dict[str, Any], extractor: nn.Module,
                    compute: Callable[[], FeatureStats]) -> FeatureStats | None:
    """``cached_reference_stats`` on rank 0 with a ``compute`` that every rank runs together when the cache is
    missing or stale (rank 0 tells the others by a broadcast). Rank 0 returns the stats, the others None."""
    if rank_world()[0] != 0:
        if broadcast_object(None) == "compute":
            compute()
        return None
    called = False

    def run() -> FeatureStats:
        nonlocal called
        called = True
        broadcast_object("compute")
        return compute()

    try:
        stats = cached_reference_stats(path, meta, extractor, run)
    except BaseException:
        if not called:
            broadcast_object("error")
        raise
    if not called:
        broadcast_object("cached")
    return stats


def _png_images(out_dir: Path, n: int) -> Iterator[np.ndarray]:
    for i in range(n):
        with Image.open(image_path(out_dir, i)) as img:
            yield np.asarray(img.convert("RGB"))


def evaluate_generation(
    model: LatentDiffusion,
    dataset: Dataset,
    *,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    n_samples: int,
    extractor: nn.Module,
    device: torch.device,
    sampler: str,
    steps: int,
    cfg_scale: float,
    seed: int = 0,
    sampler_options: dict | None = None,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    stats_dir: str | os.PathLike = "outputs/fid_stats",
    split: str = "val",
    resolution: int | None = None,
    n_reference: int | None = None,
    alignment: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Generate ``n_samples`` images from the captions of ``dataset`` (the evaluation split, eval view) and
    measure them against the split's real images.

    Reference statistics: the first ``n_reference`` (default ``n_samples``) real images of the split at
    ``resolution`` (the checkpoint's), cached in ``stats_dir`` under a name built from the dataset, split,
    resolution, count and extractor, and reused while all of them match. ``alignment``: also score how well
    the images follow their captions (``shapes`` only). Returns the partial results dict of
    ``ldm.metrics.results`` on rank 0 (metrics: fid, kid, [is], [alignment, alignment_<attribute>]), None on
    the other ranks.
    """
    started = time.perf_counter()
    phases = Phases()
    rank, world = rank_world()
    out_dir = Path(out_dir)
    field = "label" if getattr(model.text_encoder, "input_key", "caption") == "label" else "caption"
    with phases("checkpoint_sha256"):
        sha = file_sha256(checkpoint) if rank == 0 else None
    settings = {"checkpoint_sha256": sha, "sampler": sampler,
                "steps": steps, "cfg_scale": cfg_scale, "sampler_options": sampler_options or {}, "seed": seed,
                "batch_size": batch_size, "precision": str(autocast_dtype or "fp32"), "condition": field}
    with phases("prompts"):
        prompts = read_prompts(dataset, n_samples, field, batch_size, num_workers)
    problem = _prepare(out_dir, settings, prompts, overwrite) if rank == 0 else None
    check_on_rank0(problem)
    barrier()
    prompts = [p["prompt"] for p in prompts]

    # reference statistics first: a data problem shows before the long generation
    count = n_reference or n_samples
    count = count if isinstance(dataset, IterableDataset) else min(count, len(dataset))
    meta = {"dataset": repr(dataset), "split": split, "resolution": resolution, "count": count}
    name = type(dataset).__name__.lower().removesuffix("dataset") or "data"
    key = hashlib.sha256(json.dumps({**meta, "extractor": extractor.identity()}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    stats_path = Path(stats_dir) / f"{name}-{split}-{resolution}px-n{count}-{extractor.name}-{key}.npz"
    with phases("reference_stats"):
        real = reference_stats(stats_path, meta, extractor, lambda: to_stats(
            dataset_features(dataset, extractor, device, count, batch_size, num_workers, "reference features",
                             progress), extractor, meta))

    generated, gen_seconds = generate_images(
        model, prompts, out_dir, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
        sampler_options=sampler_options, batch_size=batch_size, autocast_dtype=autocast_dtype,
        progress=progress)
    generated = sum(gather_values(generated))
    barrier()
    with Image.open(image_path(out_dir, 0)) as first:
        side = first.size[0]
    fakes = ImageFolderDataset(out_dir / "images", split="all", resolution=side)
    with phases("generated_features"):
        fake_features = dataset_features(fakes, extractor, device, n_samples, batch_size, num_workers,
                                         "generated features", progress)
    if rank != 0:
        return None
    fake = to_stats(fake_features, extractor, {"images": str(out_dir / "images"), "count": n_samples})
    metrics = feature_metrics(real, fake, seed=seed)
    if alignment:
        with phases("alignment"):
            metrics.update(alignment_metrics(out_dir, prompts))
    with phases("sample_grid"):
        save_sample_grid(out_dir, n_samples)
    seconds = time.perf_counter() - started
    return {"task": "generation", "metrics": metrics, "n_images": fake.count, "n_reference": real.count,
            "reference_stats": str(stats_path), "extractor": extractor.identity(), "images": str(out_dir / "images"),
            "timing": {"seconds": round(seconds, 3), "seconds_per_1000_images": round(1000 * seconds / fake.count, 3),
                       "generated_now": generated, "generation_seconds": round(gen_seconds, 3),
                       "generation_seconds_per_1000_images":
                           round(1000 * gen_seconds / generated, 3) if generated else None,
                       "phase_seconds": {"generation": round(gen_seconds, 3), **phases.seconds}}}


class Phases:
    """Wall seconds per named phase of an evaluation: ``with phases("alignment"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def save_sample_grid(out_dir: Path, n: int, count: int = 64, nrow: int = 8) -> Path:
    """``out_dir/samples.png``: the first ``count`` generated images, ``nrow`` per row (prompts in index order,
    as listed in prompts.jsonl), for a look at what the numbers measured."""
    images = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in _png_images(out_dir, min(n, count))]
    grid = make_grid(torch.stack(images).float() / 255, nrow=nrow, padding=2)
    return atomic_write(out_dir / "samples.png", lambda tmp: save_image(grid, tmp, format="PNG"))


def alignment_metrics(out_dir: Path, prompts: list[str]) -> dict[str, float]:
    """Text alignment of the generated PNGs with their captions (``shapes``): ``alignment`` (all attributes
    right) and ``alignment_<attribute>`` shares."""
    score = alignment_score(_png_images(out_dir, len(prompts)), prompts)
    out = {"alignment": float(score["alignment"])}
    out.update({f"alignment_{k}": float(v) for k, v in score["per_attribute"].items() if k != "all"})
    return out
