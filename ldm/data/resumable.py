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
    ``start``: samples of this rank's share to skip in the next pass. A ``ResumableDataLoader`` sets ``plan`` =
    (epoch, start) for the pass it begins, which wins over ``set_epoch`` calls made before the pass reads its
    order (Lightning sets its own epoch number between creating the iterator and the first batch).
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.start = 0
        self.plan: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self, epoch: int) -> list[int]:
        rank, world = rank_and_world()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        return order[: self.size // world * world][rank::world]

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.plan if self.plan is not None else (self.epoch, self.start)
        self.plan = None
        return iter(self._order(epoch)[start:])

    def __len__(self) -> int:
        return self.size // rank_and_world()[1]


class ResumableDataLoader(DataLoader):
    """A train DataLoader that owns its place in the data: the pass (epoch) in progress and the samples of it the
    training steps have used (see module docstring).

    ``advance(n)`` is called once per training batch with the number of samples it held (by the training-state
    callback of train.py); ``state_dict()`` is what Lightning stores in the checkpoint, and ``load_state_dict``
    restores it. Every ``iter()`` continues the pass in progress after its used samples, or starts the next pass
    when no full batch of it is left. The data sequence therefore does not depend on where Lightning's own epoch
    counter stands after a resume (it closes an epoch when a run stops on ``max_steps``, and counts a resumed
    epoch in batches of the old batch size). With a map-style dataset the sampler must be an
    ``EpochShuffleSampler``.
    """

    def __init__(self, dataset: Any, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.iterable = isinstance(dataset, IterableDataset)
        if not self.iterable:
            if not isinstance(self.sampler, EpochShuffleSampler):
                raise TypeError("ResumableDataLoader needs an EpochShuffleSampler for a map-style dataset")
        self.seed = int(seed)
        self.epoch = 0  # the pass in progress
        self.consumed = 0  # samples of it that training steps have used
        self._exhausted = False  # the pass's iterator ended (iterables without a length)
        self._started = False

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the loader keeps its own pass count (Lightning's epoch may differ after a resume)."""

    def advance(self, samples: int) -> None:
        self.consumed += int(samples)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._started, self._exhausted = True, False

    def _pass_done(self) -> bool:
        try:
            full = len(self) * self.batch_size  # samples per pass in whole batches (drop_last)
        except TypeError:  # an iterable without a length
            return self._exhausted
        return self.consumed + self.batch_size > full

    def __iter__(self):
        if self._started and self._pass_done():
            self.epoch, self.consumed = self.epoch + 1, 0
        self._started, self._exhausted = True, False
        if self.generator is not None:  # worker seeds: a function of (seed, epoch), not of earlier passes
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if not self.iterable:
            self.sampler.plan = (self.epoch, self.consumed)
            return self._until_exhausted(super().__iter__(), 0)
        return self._until_exhausted(super().__iter__(), self.consumed)

    def _until_exhausted(self, batches, skip: int):
        dropped = 0
        for batch in batches:
            if dropped < skip:  # iterables: re-read and drop what the steps already used
                dropped += batch_len(batch)
                continue
            yield batch
        self._exhausted = True


def batch_len(batch: Any) -> int:
    """Samples in a batch of ours (stage 1: ``image``, stage 2: ``mean``), or ``len`` of anything else."""
    for key in ("image", "mean"):
        if isinstance(batch, dict) and key in batch:
            return int(batch[key].shape[0])
    return len(batch)
