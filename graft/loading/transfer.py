"""The transfer step of `graft.load`, and the one-process transfer.

`graft.load` opens, plans and validates, then hands the bytes' journey to a `Transfer`:
`LocalTransfer` here, or a distributed one (graft.loading.distributed); that step is the
only one that differs between one process and a process group.

In one process, where a model tensor is a contiguous CPU tensor of the checkpoint's dtype
and shape (the usual case), its bytes are read straight into the parameter's own memory:
no second copy of the model ever exists. Anything else (a cast, an overlap copy, a GPU or
non-contiguous destination) goes through a temporary of one tensor at a time, so extra
memory stays bounded by the largest such tensor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import torch
import torch.distributed as dist

from graft._logging import get_logger, progress
from graft.errors import PlanError
from graft.loading.formats.base import Checkpoint
from graft.loading.plan import Entry, LoadPlan, model_tensors

log = get_logger(__name__)
# Below this, a progress bar is only noise.
_PROGRESS_MIN_BYTES = 256 << 20


@dataclass
class TransferStats:
    bytes_read: int
    seconds: float


@dataclass(kw_only=True)
class LoadContext:
    """What every step of one `graft.load` call shares."""

    model: torch.nn.Module
    plan_kwargs: dict
    """rename, include, exclude, on_mismatch, strip_prefixes, as `graft.plan` takes them."""
    bucket_mb: float
    """Distributed: the staging memory of the stream on every rank."""
    show_progress: bool
    rank: int = 0
    world: int = 1
    start: float = field(default_factory=time.perf_counter)
    """When the call began: a distributed load reports the time of the whole call."""

    @classmethod
    def begin(cls, model: torch.nn.Module, *, plan_kwargs: dict, bucket_mb: float, show_progress: bool,
              distributed: bool) -> LoadContext:
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        return cls(model=model, plan_kwargs=plan_kwargs, bucket_mb=bucket_mb, show_progress=show_progress,
                   rank=rank, world=world)


class Transfer(Protocol):
    """How the planned bytes reach the model: the step of `graft.load` chosen per call."""

    def source(self, ckpt: Checkpoint | str | os.PathLike | None) -> Checkpoint | str | os.PathLike:
        """What this rank opens and plans against."""

    def failed(self, error: Exception) -> NoReturn:
        """This rank could not open, plan or validate: raise, on every rank, the same error."""

    def run(self, opened: Checkpoint, plan: LoadPlan) -> tuple[LoadPlan, TransferStats]:
        """Move the bytes; returns the plan to report (rank 0's, on every rank) and the figures."""


@dataclass
class LocalTransfer:
    """One process: read the planned tensors straight into the model."""

    ctx: LoadContext

    def source(self, ckpt: Checkpoint | str | os.PathLike | None) -> Checkpoint | str | os.PathLike:
        return ckpt

    def failed(self, error: Exception) -> NoReturn:
        raise error

    def run(self, opened: Checkpoint, plan: LoadPlan) -> tuple[LoadPlan, TransferStats]:
        return plan, load_into(self.ctx.model, plan, opened, show_progress=self.ctx.show_progress)


def is_direct(entry: Entry, dest: torch.Tensor) -> bool:
    """True when the checkpoint bytes can land in `dest` as they are."""
    return (
        not entry.partial
        and dest.device.type == "cpu"
        and dest.is_contiguous()
        and dest.dtype == entry.ckpt_dtype
        and tuple(dest.shape) == tuple(entry.ckpt_shape)
    )


def copy_into(entry: Entry, dest: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a checkpoint value into a model tensor: cast, device move or overlap slice."""
    if entry.partial:
        region = entry.overlap()
        dest[region].copy_(value[region])
    else:
        dest.copy_(value.reshape(dest.shape))


def load_into(model: torch.nn.Module, plan: LoadPlan, ckpt: Checkpoint, *, show_progress: bool = True) -> TransferStats:
    """Copy every planned tensor from `ckpt` into `model`; `ckpt` was validated for `plan`
    (graft.load does so before any transfer: a bad shard fails before a parameter changes)."""
    start = time.perf_counter()
    before = ckpt.bytes_read
    tensors = model_tensors(model)
    todo = [e for e in plan.entries.values() if e.reads_bytes]
    on_meta = [k for k, (t, _) in tensors.items() if t.device.type == "meta"]
    if on_meta:
        # One process has no rank 0 to take values from: new tensors would stay unset.
        raise PlanError(
            f"{ckpt.path}: the model has tensors on the meta device ({on_meta[:3]}...), which a"
            " single-process load cannot fill\n  way out: build the model on a real device, or"
            " model.to_empty(device='cpu') and initialise the new parts, before graft.load"
        )
    direct, staged = [], []
    for e in todo:
        dest = tensors[e.model_key][0].data
        (direct if is_direct(e, dest) else staged).append((e, dest))
    bar = progress(plan.bytes_to_read, f"graft load {ckpt.path.name}",
                   enabled=show_progress and plan.bytes_to_read >= _PROGRESS_MIN_BYTES)
    with torch.no_grad(), bar:
        ckpt.read_into([(e.ckpt_key, dest) for e, dest in direct], on_bytes=bar.update)
        for e, dest in staged:
            value = ckpt.tensor(e.ckpt_key)
            copy_into(e, dest, value)
            bar.update(value.numel() * value.element_size())
    return TransferStats(ckpt.bytes_read - before, time.perf_counter() - start)
