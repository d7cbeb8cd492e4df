"""Move the planned tensors from the checkpoint into the model (one process).

Where a model tensor is a contiguous CPU tensor of the checkpoint's dtype and shape (the
usual case), its bytes are read straight into the parameter's own memory: no second copy
of the model ever exists. Anything else (a cast, an overlap copy, a GPU or non-contiguous
destination) goes through a temporary of one tensor at a time, so extra memory stays
bounded by the largest such tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

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
    """Copy every planned tensor from `ckpt` into `model`."""
    start = time.perf_counter()
    before = ckpt.bytes_read
    tensors = model_tensors(model)
    todo = [e for e in plan.entries.values() if e.reads_bytes]
    # All checks first: a bad shard must fail before the first parameter changes.
    ckpt.validate(e.ckpt_key for e in todo)
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
