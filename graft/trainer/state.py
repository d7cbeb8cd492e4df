"""The train state: counters, the position in the data, and every RNG of every rank.

The data order is a pure function of (seed, epoch) (`graft.sampler.EpochSampler`), so the
GLOBAL position in the epoch (samples consumed, by any number of ranks) is all a checkpoint
needs to continue the stream; no iterator state is pickled.

RNG across world sizes: at the world size that saved, every rank gets its own generators back
exactly (`restore_rng`). At another world size there is no "own" state to give a rank, so each
rank's generators are seeded afresh from (seed, global step, rank) (`derive_rng`), and the
trainer logs that it did so: never a silent mix of other ranks' states.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class TrainState:
    """Counters of a run; `epoch` counts completed epochs, `batch_in_epoch` the batches of the next one."""

    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps taken in the whole run."""
    batch_in_epoch: int = 0
    """Steps of epoch `epoch` already taken (non-zero only in a mid-epoch checkpoint)."""
    samples_in_epoch: int = 0
    """Samples of epoch `epoch` already consumed, by all ranks together: the position in the
    epoch's order (`graft.sampler.EpochSampler`), valid at any world size."""
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


RNG_POLICY_SAME = "restored"
RNG_POLICY_DERIVED = "derived"


def derive_rng(seed: int, step: int, rank: int) -> int:
    """Seed python, numpy, torch (and CUDA) of this rank from (seed, global step, rank); returns the seed."""
    import hashlib

    digest = hashlib.sha256(f"graft-rng|{seed}|{step}|{rank}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little") % (2**63)
    random.seed(derived)
    torch.manual_seed(derived)  # also every CUDA device
    try:
        import numpy as np

        np.random.seed(derived % 2**32)
    except ImportError:
        pass
    return derived
