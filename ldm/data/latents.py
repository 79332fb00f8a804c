"""Cached latents for stage 2: the datasets that read a latent cache (posterior sampling and normalisation of the
latents they hold: ``ldm.models.distributions.sample_posterior``, ``ldm.models.latent_stats.normalize_latents``).

A cache (written by ``python -m ldm.cache``, see ``ldm/cache.py``) is a folder with ``manifest.json`` and
``<split>/shard-NNNNNN.tar`` webdataset shards of the posterior mean/logvar, captions and optional text embeddings;
its format (manifest, sample codec) is in ``ldm/data/latent_format.py``, whose manifest API is re-exported here.

Storing the posterior rather than one sample lets training draw a fresh z ~ q(z|x) every time an image is seen
(as EDM2, Karras et al. 2024, App. C), and the stored latent statistics normalise z in one place.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.common import stable_hash
from ldm.data.datamodules import make_loader
from ldm.data.latent_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    LIST_FIELDS,
    MANIFEST_NAME,
    autoencoder_identity,
    check_cache_compatible,
    check_shard_files,
    collate_latents,
    iter_shards,
    read_manifest,
    split_info,
)

__all__ = [  # own names, then the manifest API of ldm.data.latent_format (imported from here before the split)
    "LatentDataModule", "LatentMemoryDataset", "LatentShardDataset",
    "CACHE_FORMAT", "CACHE_VERSION", "MANIFEST_NAME", "autoencoder_identity", "check_cache_compatible",
    "collate_latents", "read_manifest", "split_info",
]


# ------------------------------------------------------------------------------------------- datasets

def _buffer_shuffle(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle a stream through a buffer of ``size`` samples (as webdataset's ``shuffle``); size <= 1: as is."""
    if size <= 1:
        yield from items
        return
    buf: list[dict] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class LatentShardDataset(IterableDataset):
    """Streams one split of a latent cache (format: ``ldm/data/latent_format.py``), decoded to float32 tensors.

    Splitting across DDP ranks and DataLoader workers (rank/world from RANK/WORLD_SIZE or torch.distributed,
    else from where the dataset was built, as ``ldm.data.shards.WebDatasetImages``):
    - train with at least ``world`` shards: rank r reads shards r, r+W, ...; every rank yields exactly
      ``len(self)`` samples per epoch (``epoch_size``, default total // world), re-reading its shards as
      needed, and the same number of active workers on every rank share that quota, so all ranks see the
      same number of batches (DDP would hang otherwise). Shard order and a sample buffer are shuffled per epoch.
    - val, or fewer shards than ranks: one worker per rank reads all shards and keeps the samples whose
      position p in the split has p % world == rank, for p < (total // world) * world: disjoint, equal counts
      (total // world per rank), at most world - 1 samples left out. Meant for small splits.
    """

    def __init__(self, path: str | Path, split: str = "train", shuffle_buffer: int = 1000,
                 epoch_size: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        info = split_info(self.manifest, split)
        check_shard_files(self.root, info["shards"])  # a cut copy of the cache is an error, not a shorter epoch
        self.split = split
        self.shards = [(str(self.root / s["name"]), int(s["num_samples"])) for s in info["shards"]]
        self.total = int(info["num_samples"])
        self.training = split == "train"
        if shuffle_buffer < 0 or (epoch_size is not None and epoch_size < 1):
            raise ValueError(f"need shuffle_buffer >= 0 and epoch_size >= 1 or None, got {shuffle_buffer}, "
                             f"{epoch_size}")
        self.shuffle_buffer = shuffle_buffer if self.training else 0
        self.epoch_size = epoch_size
        self.seed = int(seed)
        self._built_rank, self._built_world = wds.utils.pytorch_worker_info()[:2]
        if self.total < self._built_world:
            raise ValueError(f"the {split!r} split of {self.root} has {self.total} samples, fewer than the "
                             f"{self._built_world} ranks")
        self.epoch: int | None = None  # None: every pass of this copy counts as a new epoch
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shard order and buffer shuffle the next pass draws (``ResumableDataLoader`` sets it)."""
        self.epoch = int(epoch)

    def rank_and_world(self) -> tuple[int, int]:
        rank, world = wds.utils.pytorch_worker_info()[:2]
        return (rank, world) if world > 1 else (self._built_rank, self._built_world)

    def _by_shard(self, world: int) -> bool:
        return self.training and len(self.shards) >= world

    def __len__(self) -> int:
        world = self._built_world
        if self._by_shard(world) and self.epoch_size is not None:
            return self.epoch_size
        return self.total // world

    def __iter__(self) -> Iterator[dict]:
        rank, world = self.rank_and_world()
        _, _, worker, n_workers = wds.utils.pytorch_worker_info()
        # a pure function of (seed, epoch, rank, worker): a resumed run re-reads exactly the stream it stopped in
        epoch = self.epoch if self.epoch is not None else self._passes
        self._passes += 1
        base = stable_hash(self.seed, rank, worker, n_workers, epoch)
        if self._by_shard(world):
            active = min(n_workers, len(self.shards) // world)
            if worker >= active:
                return
            mine = [url for url, _ in self.shards[rank::world]][worker::active]
            length = len(self)
            quota = length // active + (worker < length % active)
            produced, passes = 0, 0
            while produced < quota:
                rng = random.Random(base + passes)
                order = rng.sample(mine, len(mine))
                before = produced
                for sample in _buffer_shuffle(iter_shards(order), self.shuffle_buffer, rng):
                    yield sample
                    produced += 1
                    if produced >= quota:
                        return
                if produced == before:
                    raise ValueError(f"shards {order} of {self.root} hold no samples; rebuild the cache")
                passes += 1
            return
        if worker > 0:  # one reader per rank: equal per-rank counts whatever the number of workers
            return
        limit = (self.total // world) * world

        def mine() -> Iterator[dict]:
            for pos, sample in enumerate(iter_shards([u for u, _ in self.shards])):
                if pos >= limit:
                    return
                if pos % world == rank:
                    yield sample

        yield from _buffer_shuffle(mine(), self.shuffle_buffer, random.Random(base))

    def __repr__(self) -> str:
        return (f"LatentShardDataset({str(self.root)!r}, split={self.split!r}, samples={self.total}, "
                f"shards={len(self.shards)}, shuffle_buffer={self.shuffle_buffer})")


class LatentMemoryDataset(Dataset):
    """One split of a latent cache decoded once into tensors (stored dtype), served map-style as float32.

    For small caches, where decoding tar members would dominate a training step. Use it with any sampler
    (Lightning swaps in a DistributedSampler under DDP). A DataLoader fetches whole batches through
    ``__getitems__`` (one gather per tensor instead of a dict per sample and a collate). ``on_gpu()`` keeps the
    tensors on the current CUDA device (moved at the first batch, after the trainer chose the device): batches are
    gathered there, with no host copy and no worker, and equal the host batches.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.split = split
        shards = split_info(self.manifest, split)["shards"]
        check_shard_files(self.root, shards)
        urls = [str(self.root / s["name"]) for s in shards]
        samples = list(iter_shards(urls, float32=False))
        if not samples:
            raise ValueError(f"the {split!r} split of {self.root} holds no samples")
        self.tensors = {k: torch.stack([s[k] for s in samples]) for k in ("mean", "logvar", "context",
                                                                          "context_mask") if k in samples[0]}
        self.lists = {k: [s[k] for s in samples] for k in LIST_FIELDS}
        self.labels = torch.tensor([s["label"] for s in samples]) if "label" in samples[0] else None
        self._gpu = False  # move to the current CUDA device at the next batch

    def __len__(self) -> int:
        return len(self.lists["key"])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def on_gpu(self) -> LatentMemoryDataset:
        self._gpu = True
        return self

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = {k: (v[index].float() if v.is_floating_point() else v[index]) for k, v in self.tensors.items()}
        out.update({k: v[index] for k, v in self.lists.items()})
        if self.labels is not None:
            out["label"] = int(self.labels[index])
        return out

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """The batch of ``indices``, as ``collate_latents`` of their ``__getitem__`` samples would be."""
        if self._gpu and next(iter(self.tensors.values())).device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
            self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
            self.labels = self.labels.to(device) if self.labels is not None else None
        device = next(iter(self.tensors.values())).device
        idx = torch.as_tensor(indices, dtype=torch.long)
        if device.type == "cuda":  # a pinned, non-blocking copy: the step does not wait for the GPU
            idx = idx.pin_memory().to(device, non_blocking=True)
        out: dict[str, Any] = {k: [v[i] for i in indices] for k, v in self.lists.items()}
        out.update({k: (v[idx].float() if v.is_floating_point() else v[idx]) for k, v in self.tensors.items()})
        if self.labels is not None:
            out["label"] = self.labels[idx]
        return out

    def __repr__(self) -> str:
        where = ", on the GPU" if self._gpu else ""
        return f"LatentMemoryDataset({str(self.root)!r}, split={self.split!r}, samples={len(self)}{where})"


class LatentDataModule:
    """Train/val DataLoaders over a latent cache, like ``ldm.data.datamodules.ImageDataModule``.

    Args:
        path: the cache folder (holding manifest.json).
        batch_size, val_batch_size: per rank (val defaults to batch_size).
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader settings.
        in_memory: True = ``LatentMemoryDataset`` (decode every split once), False = ``LatentShardDataset``
            (stream), None = in memory when the split's shards total at most ``in_memory_max_mb``.
        on_gpu: keep in-memory splits of at most ``on_gpu_max_mb`` on the training GPU and gather batches there
            (no workers, no host copies; train.py turns it on for CUDA runs). Streamed splits ignore it.
        shuffle_buffer, epoch_size: streaming only (see ``LatentShardDataset``).
        seed: shuffling seed (epoch-seeded permutation in memory, shard/buffer shuffling when streaming).

    Batches: mean, logvar float32 [B, C, h, w]; caption, attributes, key lists of str; label LongTensor [B]
    and context [B, L, D] / context_mask [B, L] (bool) when cached. Train loaders drop the last partial batch.
    """

    def __init__(self, path: str | Path, batch_size: int = 64, val_batch_size: int | None = None,
                 num_workers: int = 2, in_memory: bool | None = None, in_memory_max_mb: float = 1024,
                 shuffle_buffer: int = 1000, epoch_size: int | None = None, pin_memory: bool = True,
                 persistent_workers: bool | None = None, prefetch_factor: int | None = None, seed: int = 0,
                 on_gpu: bool = False, on_gpu_max_mb: float = 4096) -> None:
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1) or num_workers < 0:
            raise ValueError(f"need batch sizes >= 1 and num_workers >= 0, got {batch_size}, {val_batch_size}, "
                             f"{num_workers}")
        self.path = Path(path)
        self._manifest = read_manifest(self.path)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers = num_workers
        self.in_memory, self.in_memory_max_mb = in_memory, in_memory_max_mb
        self.shuffle_buffer, self.epoch_size = shuffle_buffer, epoch_size
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.persistent_workers = (num_workers > 0) if persistent_workers is None else (
            bool(persistent_workers) and num_workers > 0)
        self.prefetch_factor = prefetch_factor
        self.seed = int(seed)
        self.on_gpu, self.on_gpu_max_mb = bool(on_gpu), on_gpu_max_mb
        self._datasets: dict[str, Dataset] = {}

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def _use_memory(self, split: str) -> bool:
        if self.in_memory is not None:
            return bool(self.in_memory)
        size = sum(int(s.get("bytes", 0)) for s in split_info(self._manifest, split)["shards"])
        return size <= self.in_memory_max_mb * 2**20

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train" or "val"), built on first request and cached."""
        if split not in self._datasets:
            if self._use_memory(split):
                self._datasets[split] = LatentMemoryDataset(self.path, split)
            else:
                self._datasets[split] = LatentShardDataset(self.path, split, self.shuffle_buffer,
                                                           self.epoch_size if split == "train" else None,
                                                           seed=self.seed + (split != "train"))
        return self._datasets[split]

    def _loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        train = split == "train"
        batch_size = self.batch_size if train else self.val_batch_size
        if train and len(ds) < batch_size:
            raise ValueError(f"the train split has {len(ds)} samples per rank, fewer than batch_size={batch_size}; "
                             "with drop_last no batch would remain. Lower batch_size or cache more images.")
        extra: dict[str, Any] = {"collate_fn": collate_latents}
        workers, pin = self.num_workers, self.pin_memory
        if self._gpu_resident(ds):  # batches are gathered on the GPU in this process
            ds.on_gpu()
            workers, pin = 0, False
        if workers > 0:
            extra["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                extra["prefetch_factor"] = self.prefetch_factor
        return make_loader(ds, train, batch_size, workers, pin, self.seed + (not train), **extra)

    def _gpu_resident(self, ds: Dataset) -> bool:
        return (self.on_gpu and torch.cuda.is_available() and isinstance(ds, LatentMemoryDataset)
                and ds.nbytes <= self.on_gpu_max_mb * 2**20)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def describe(self) -> str:
        m = self._manifest
        counts = ", ".join(f"{s}: {info['num_samples']}" for s, info in m["splits"].items())
        lines = [f"LatentDataModule({str(self.path)!r}, latents {m['latent_shape']} {m['dtype']}, {counts}; "
                 f"autoencoder {m['autoencoder']['identity'][:12]}, batch_size={self.batch_size}, "
                 f"num_workers={self.num_workers}, in_memory={self.in_memory}, on_gpu={self.on_gpu}, seed={self.seed})"]
        lines += [f"  {split}: {ds!r}" for split, ds in self._datasets.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()

