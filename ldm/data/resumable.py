"""Train loaders that can stop anywhere inside an epoch and continue exactly there after a restart.

A days-long run is stopped mid-epoch by pre-emption, a signal or a crash. Resuming must neither replay the
epoch's first batches nor skip the rest. Three pieces make that exact:

- ``EpochShuffleSampler``: the epoch's order is a pure function of (seed, epoch); under DDP every rank takes its
  own stride of it (equal counts; replaces Lightning's DistributedSampler, which cannot start mid-epoch);
- ``ResumableDataLoader``: a DataLoader with ``state_dict`` / ``load_state_dict`` (the interface Lightning saves in
  its checkpoints for loaders that have it) holding the epoch and the number of samples the *training step* has
  consumed (``advance``; batches a worker has prefetched do not count), and that starts its next pass there;
- loader generators re-seeded per epoch, so worker seeds (random crops/flips in workers) do not depend on how
  many passes came before in this process.

Map-style datasets (shapes, folder, emoji, fashion_mnist, in-memory latents) resume at the exact sample. Iterable
datasets (webdataset shards, streamed latents) are fast-forwarded by reading and dropping the batches already
consumed: exact when their stream is a function of (seed, epoch, rank, worker), which ours are, at the cost of
re-reading that part of the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that is a pure function of (seed, epoch), split across DDP ranks.

    A plain ``shuffle=True`` draws each epoch's order from a generator whose state lives only in memory, so a
    resumed run would see another order than the uninterrupted run. Rank r of W takes positions r, r+W, ... of the
    permutation cut to a multiple of W (equal counts on every rank, as DDP needs; at most W-1 samples of an epoch
    left out). ``shuffle=False``: the identity order, split the same way (validation under DDP).
    ``start``: samples of this rank's share to skip in the next pass (set by ``ResumableDataLoader``).
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> list[int]:
        rank, world = rank_and_world()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        return order[: self.size // world * world][rank::world]

    def __iter__(self) -> Iterator[int]:
        order = self._order()[self.start:]
        self.start = 0  # one pass only: the following epochs start at their beginning
        return iter(order)

    def __len__(self) -> int:
        return self.size // rank_and_world()[1]


class ResumableDataLoader(DataLoader):
    """A train DataLoader whose position inside the epoch is part of every checkpoint (see module docstring).

    ``advance(n)`` is called once per training batch with the number of samples it held (by
    the training-state callback of train.py); ``state_dict()`` is what Lightning stores under ``loops`` in the
    checkpoint, and ``load_state_dict`` makes the next pass start after the consumed samples. With a map-style
    dataset the sampler must be an ``EpochShuffleSampler``.
    """

    def __init__(self, dataset: Any, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.iterable = isinstance(dataset, IterableDataset)
        if not self.iterable and not isinstance(self.sampler, EpochShuffleSampler):
            raise TypeError("ResumableDataLoader needs an EpochShuffleSampler for a map-style dataset")
        self.seed = int(seed)
        self.epoch = 0
        self.consumed = 0  # samples of this epoch that training steps have used
        self._skip = 0  # samples to skip at the start of the next pass (resume)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.consumed = int(epoch), 0
        if not self.iterable:
            self.sampler.set_epoch(epoch)

    def advance(self, samples: int) -> None:
        self.consumed += int(samples)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = self._skip = int(state["consumed"])
        if not self.iterable:
            self.sampler.set_epoch(self.epoch)

    def __iter__(self):
        if self.generator is not None:  # worker seeds: a function of (seed, epoch), not of earlier passes
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        skip, self._skip = self._skip, 0
        if not self.iterable:
            self.sampler.start = skip
            return super().__iter__()
        return self._fast_forward(super().__iter__(), skip)

    def _fast_forward(self, batches, skip: int):
        dropped = 0
        for batch in batches:
            if dropped < skip:
                dropped += _batch_len(batch)
                continue
            yield batch


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return len(batch)
