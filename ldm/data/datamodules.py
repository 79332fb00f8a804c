"""DataLoaders for train/val/test built lazily from one dataset factory.

A plain class with the three ``*_dataloader`` methods Lightning looks for, so the LightningModule (in
``ldm/lit``) can delegate to it without this package importing Lightning. With Hydra the factory is a
partial: ``dataset: {_target_: ldm.data.shapes.ShapesDataset, _partial_: true, resolution: 64}``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.resumable import EpochShuffleSampler, ResumableDataLoader

SPLITS = ("train", "val", "test")


def _factory_name(factory: Callable) -> str:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return getattr(factory, "__qualname__", repr(factory))


class ImageDataModule:
    """Builds ``dataset(split=...)`` on first use (cached) and wraps it in a DataLoader.

    Args:
        dataset: callable taking ``split=`` ("train"/"val"/"test") and returning a map-style or iterable
            dataset of sample dicts (see ``ldm.data.common``).
        batch_size: train batch size (per rank).
        val_batch_size: val/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory; only takes effect when CUDA is available.
        persistent_workers: keep workers alive between epochs; None = yes when num_workers > 0.
        seed: seeds each loader's generator, which drives shuffling and the per-worker seeds of torch,
            random and numpy (hence random crops/flips): the same seed and worker count give the same batches.
        prefetch_factor: batches prefetched per worker (None = torch default).
        shuffle: shuffle map-style train data (an epoch-seeded permutation, see ``EpochShuffleSampler``).

    Train loaders shuffle (map-style datasets only; iterable datasets shuffle themselves) and drop the last
    partial batch; val/test loaders do neither (and the datasets turn random crops/flips off outside train).
    """

    def __init__(self, dataset: Callable[..., Dataset], batch_size: int = 16, val_batch_size: int | None = None,
                 num_workers: int = 2, pin_memory: bool = True, persistent_workers: bool | None = None,
                 seed: int = 0, prefetch_factor: int | None = None, shuffle: bool = True) -> None:
        if not callable(dataset):
            raise TypeError(f"dataset must be a callable taking split=..., got {type(dataset).__name__}; with "
                            "Hydra add `_partial_: true` to the dataset config")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset_factory = dataset
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.persistent_workers = (num_workers > 0) if persistent_workers is None else (
            bool(persistent_workers) and num_workers > 0)
        self.seed = int(seed)
        self.prefetch_factor = prefetch_factor
        self.shuffle = bool(shuffle)
        self._datasets: dict[str, Dataset] = {}

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``, built on first request and cached."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._datasets:
            self._datasets[split] = self.dataset_factory(split=split)
        return self._datasets[split]

    def _loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        train = split == "train"
        iterable = isinstance(ds, IterableDataset)
        batch_size = self.batch_size if train else self.val_batch_size
        if train and not iterable and len(ds) < batch_size:
            raise ValueError(f"the train split has {len(ds)} samples, fewer than batch_size={batch_size}; "
                             "with drop_last no batch would remain. Lower batch_size or add data.")
        # Offset the seed per split so train and val workers do not share random streams.
        extra = {}
        if self.num_workers > 0:
            extra["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                extra["prefetch_factor"] = self.prefetch_factor
        return make_loader(ds, train, batch_size, self.num_workers, self.pin_memory, self.seed + SPLITS.index(split),
                           shuffle=self.shuffle, **extra)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def describe(self) -> str:
        """One line per built split plus the loader settings, for logs."""
        lines = [f"ImageDataModule(dataset={_factory_name(self.dataset_factory)}, batch_size={self.batch_size}, "
                 f"val_batch_size={self.val_batch_size}, num_workers={self.num_workers}, "
                 f"pin_memory={self.pin_memory}, persistent_workers={self.persistent_workers}, seed={self.seed})"]
        for split, ds in self._datasets.items():
            try:
                size = f"{len(ds)} samples"
            except TypeError:
                size = "unknown length"
            lines.append(f"  {split}: {size}: {ds!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()


# Center crop, no flip, no shuffling, one pass: how the latent cache and evaluate.py read a split.
CANONICAL_VIEW = {"crop": "center", "flip": False, "shuffle_buffer": 0, "epoch_size": None}


def make_loader(ds: Dataset, train: bool, batch_size: int, num_workers: int, pin_memory: bool, seed: int,
                shuffle: bool = True, **extra: Any) -> DataLoader:
    """The train loader (``ResumableDataLoader``: exact mid-epoch resume) or a val/test loader of ``ds``.

    Map-style data is split across DDP ranks by ``EpochShuffleSampler`` (train: shuffled per epoch unless
    ``shuffle=False``; val/test: in order), so the trainer runs with ``use_distributed_sampler=False``. Iterable
    datasets split themselves. Train loaders drop the last partial batch.
    """
    iterable = isinstance(ds, IterableDataset)
    sampler = None if iterable else EpochShuffleSampler(len(ds), seed, shuffle=train and shuffle)
    generator = torch.Generator().manual_seed(seed)
    if not train:
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                          generator=generator, **extra)
    if iterable and num_workers > 0:
        # fresh workers each epoch: they receive the dataset with its epoch set (ResumableDataLoader.__iter__)
        extra["persistent_workers"] = False
    return ResumableDataLoader(ds, seed=seed, batch_size=batch_size, sampler=sampler, drop_last=True,
                               num_workers=num_workers, pin_memory=pin_memory, generator=generator, **extra)


def canonical_dataset(data_module: Any, split: str) -> Dataset:
    """The ``split`` dataset of an ``ImageDataModule`` (or anything with ``dataset(split)``) in the canonical
    view: its factory is called again with the ``CANONICAL_VIEW`` arguments it accepts, so training-time
    augmentation (random crops, flips, shuffle buffers, epoch sizes) never reaches a cache or an evaluation."""
    factory = getattr(data_module, "dataset_factory", None)
    if factory is None:
        return data_module.dataset(split)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    return factory(split=split, **{k: v for k, v in CANONICAL_VIEW.items() if k in params})
