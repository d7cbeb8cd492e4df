"""The train state: counters, the data order and its position, and every RNG of every rank.

Data order is a pure function of (seed, epoch): `EpochBatchSampler` draws one permutation
per epoch from a generator seeded with both, gives rank r every world-th sample, and can
start at any batch. Saving (epoch, batch position) is therefore enough to continue the
exact same stream of batches; no iterator state needs pickling.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import Sampler

from graft.errors import ConfigError


@dataclass
class TrainState:
    """Counters of a run; `epoch` counts completed epochs, `batch_in_epoch` the batches of the next one."""

    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps taken in the whole run."""
    batch_in_epoch: int = 0
    """Batches of epoch `epoch` already consumed (non-zero only in a mid-epoch checkpoint)."""
    world_size: int = 1
    """Processes of the run that saved this state."""
    frozen: list = field(default_factory=list)
    """Parameter names frozen at the start (re-frozen on resume without rereading init.checkpoint)."""
    resumes: list = field(default_factory=list)
    """History: one entry per resume or extension (step, epoch, from, policy)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of this rank's share of a (seed, epoch) permutation, from batch `start` on.

    Every rank gets the same number of samples (the tail that does not divide by the world
    size is dropped for this epoch; a different tail is dropped next epoch), so collective
    ops stay in lockstep.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if n < world_size:
            raise ConfigError(f"{n} training samples cannot be shared by {world_size} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    @property
    def per_rank(self) -> int:
        return self.n // self.world_size

    def batches_per_epoch(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        return perm[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self):
        mine = self.indices()
        for b in range(self.start, self.batches_per_epoch()):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start


# -- RNG -------------------------------------------------------------------------------

def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states as (JSON-able dict, tensors): python, numpy, torch, cuda."""
    py = random.getstate()
    meta: dict = {"python": [py[0], list(py[1]), py[2]]}
    tensors = {"torch": torch.get_rng_state().clone()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [kind, pos, has_gauss, cached]
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s.clone()
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put back what `capture_rng` took (on the same rank)."""
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    torch.set_rng_state(tensors["torch"])
    if "numpy" in meta:
        import numpy as np

        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, cached))
    cuda = sorted(k for k in tensors if k.startswith("cuda"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
