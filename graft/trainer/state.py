"""The trainer's train state: counters and the position in the data (RNG: graft.checkpointing.rng).

The data order is a pure function of (seed, epoch) (`graft.sampler.EpochSampler`), so the
GLOBAL position in the epoch (samples consumed, by any number of ranks) is all a checkpoint
needs to continue the stream; no iterator state is pickled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
