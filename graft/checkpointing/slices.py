"""The contract between a strategy's live state and the world-size-free checkpoint.

A run checkpoint holds LOGICAL tensors (`model/<fqn>`, `optim/<fqn>/<state>`), independent of
world size and strategy. Each rank describes what it holds of them as `Holding`s: a flat
element range [start, stop) of the row-major flattened global tensor, with a 1-D view of those
values in live memory. One shape of description covers every strategy: whole tensors or 1/N
shares (single, DDP), row shards (FSDP2 `Shard(0)`), fragments of flat partitions (ZeRO).

A `StateAdapter` is one strategy's translation: `holdings()` to save (views, no gather, no
copy), `targets()` to restore (writable views, optimizer state created first if needed).
See /work/wt/ISSUE10_INTERFACE.md for the rules both sides keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Protocol, runtime_checkable

import torch

from graft.errors import GraftError


class StateMismatch(GraftError):
    """Raised by an adapter when the checkpoint does not fit the live state (names, groups...).
    The restorer re-raises it as a CheckpointError naming the checkpoint folder."""

    def __init__(self, problem: str, way_out: str):
        self.problem, self.way_out = problem, way_out
        super().__init__(f"{problem}\n  way out: {way_out}")


@dataclass(frozen=True)
class Holding:
    """Values of [start, stop) of the flattened logical tensor `name`, held by this rank."""

    name: str
    """"model/features.0.weight", "optim/features.0.weight/exp_avg", ..."""
    shape: tuple[int, ...]
    """The GLOBAL shape of the logical tensor."""
    dtype: torch.dtype
    """The dtype stored (and restored)."""
    start: int
    stop: int
    local: torch.Tensor
    """stop - start elements of `dtype`, any device; a 1-D view into live state where possible
    (save: read from it; restore: written into it)."""
    replicated: bool = False
    """The same values are held by every rank: the writer splits these bytes over ranks, so no
    byte is written twice and every rank writes about total / N."""

    def __post_init__(self):
        # Internal invariants: an adapter that breaks them is a bug, not bad input.
        assert 0 <= self.start <= self.stop <= math.prod(self.shape), (self.name, self.start, self.stop, self.shape)
        assert self.local.dtype == self.dtype, (self.name, self.local.dtype, self.dtype)
        assert self.local.numel() == self.stop - self.start, (self.name, self.local.numel(), self.start, self.stop)

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def narrow(self, start: int, stop: int) -> "Holding":
        """The sub-range [start, stop) (global flat indices) of this holding."""
        assert self.start <= start <= stop <= self.stop
        flat = self.local.reshape(-1) if self.local.dim() != 1 else self.local
        return Holding(self.name, self.shape, self.dtype, start, stop, flat[start - self.start: stop - self.start],
                       self.replicated)


def whole(name: str, tensor: torch.Tensor, *, replicated: bool) -> Holding:
    """A holding of all of `tensor` (a view of its memory when it is contiguous)."""
    t = tensor.detach()
    return Holding(name, tuple(t.shape), t.dtype, 0, t.numel(), t.reshape(-1), replicated)


@runtime_checkable
class StateAdapter(Protocol):
    """How one strategy's live state becomes logical tensors and goes back in."""

    kind: str
    """"single" | "ddp" | "fsdp2" | "deepspeed"."""

    def holdings(self) -> list[Holding]:
        """SAVE: what this rank holds (views, no gather, no copy). Replicated holdings come in the
        same order on every rank."""

    def extra_state(self) -> dict:
        """SAVE: JSON-able non-tensor state (param_groups by names...). Rank 0's is saved; it must
        not depend on the rank."""

    def targets(self, available: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[Holding]:
        """RESTORE: the ranges this rank must be given, as writable views into live state
        (creating optimizer state first if the optimizer has none yet). `available`: every
        logical tensor of the checkpoint with its global shape and dtype."""

    def load_extra_state(self, extra: dict) -> None:
        """RESTORE: put back what extra_state() returned."""

    def finish_restore(self) -> None:
        """RESTORE: after every target is filled (e.g. re-derive low-precision weights)."""
