"""A resumable, world-size-free data order: `EpochSampler`.

    sampler = EpochSampler(len(dataset), batch_size=16, seed=0, rank=rank, world_size=world)
    sampler.set_epoch(epoch, position=samples_consumed)     # position: GLOBAL samples of this epoch
    loader = DataLoader(dataset, batch_sampler=sampler)
    ...
    position = sampler.position_after(steps)                # what a checkpoint records

The order of an epoch is a function of (seed, epoch) alone: one permutation of the dataset.
The run consumes it as a stream: after `p` samples, the first `p` of the permutation have been
seen (by some rank), whatever the world size that saw them. Rank r takes every world-th sample
of the rest, in batches of `batch_size`; so at one world size the batches are those of a
`DistributedSampler`-style interleaving, and a run stopped at global position p continues at p
on any number of processes: within an epoch no sample is seen twice and none is skipped.

The tail: every rank must run the same number of steps (collectives stay in lockstep), so of
the `n - p` samples left, the last `(n - p) % world_size` are not used in this epoch (fewer than
one per rank; the next epoch's permutation puts other samples at its end). A rank's last batch
may be shorter than `batch_size`, the same length on every rank. At the world size an epoch
started with, continuing from a checkpoint gives exactly the batches of the run that never
stopped.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

_EPOCH_STRIDE = 1_000_003  # seeds of (seed, epoch) pairs never collide for epochs below it


class EpochSampler(Sampler[list[int]]):
    """Batches of this rank's share of the (seed, epoch) permutation, from a global position on."""

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if n < world_size:
            raise ValueError(f"{n} samples cannot be shared by {world_size} processes")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; use >= 1")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        """Start (or continue) `epoch` after `position` samples of it were consumed, by any world size."""
        if not 0 <= position <= self.n:
            raise ValueError(f"position {position} is outside an epoch of {self.n} samples")
        self.epoch, self.position = epoch, position

    def order(self) -> list[int]:
        """The whole epoch's permutation (the same on every rank and at every world size)."""
        g = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    @property
    def per_rank(self) -> int:
        """Samples each rank takes from the rest of this epoch."""
        return (self.n - self.position) // self.world_size

    def batches(self) -> int:
        """Steps left in this epoch (the same on every rank)."""
        return -(-self.per_rank // self.batch_size)

    def batches_per_epoch(self) -> int:
        """Steps of a whole epoch at this world size."""
        return -(-(self.n // self.world_size) // self.batch_size)

    def indices(self) -> list[int]:
        """This rank's samples for the rest of the epoch, in order."""
        end = self.position + self.per_rank * self.world_size
        return self.order()[self.position: end][self.rank:: self.world_size]

    def tail(self) -> list[int]:
        """The samples of the rest of this epoch that no rank takes (fewer than world_size)."""
        return self.order()[self.position + self.per_rank * self.world_size:]

    def position_after(self, steps: int) -> int:
        """The global position once every rank has taken `steps` batches from here."""
        return self.position + min(steps * self.batch_size, self.per_rank) * self.world_size

    def __iter__(self):
        mine = self.indices()
        for b in range(self.batches()):
            yield mine[b * self.batch_size: (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches()
