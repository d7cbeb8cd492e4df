"""A module's weights and buffers as holdings: plain tensors whole, FSDP2 DTensors by their local rows.

    model_holdings(unwrapped_model)   # model/<fqn> for every state_dict entry, views of live memory

A plain tensor (one process, DDP, FSDP2's unsharded buffers) is held in full by every rank:
`replicated=True`, and the writer splits its bytes over the ranks. A DTensor sharded on dim 0
over a 1-D mesh (FSDP2's `Shard(0)`) is held as its local rows: flat elements
[row0 * row_numel, (row0 + rows) * row_numel) of the global tensor, a view of the local shard.
Uneven shards (dim 0 not divisible by the world size) are just shorter ranges, possibly empty.
"""

from __future__ import annotations

import math
import sys

import torch

from graft.checkpointing import layout
from graft.checkpointing.slices import Holding, whole


def is_dtensor(t: torch.Tensor) -> bool:
    # No DTensor exists unless its module was imported (by FSDP2, TP...); importing it just to ask
    # costs seconds (sympy), paid by every one-process and DDP save otherwise.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def tensor_holding(name: str, t: torch.Tensor) -> Holding:
    """`t` (a live tensor or DTensor) as what this rank holds of logical tensor `name`."""
    t = t.detach()
    if not is_dtensor(t):
        return whole(name, t, replicated=True)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(t.placements)
    local = t.to_local()
    if all(isinstance(p, Replicate) for p in placements):
        return whole(name, local, replicated=True)
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise NotImplementedError(f"{name}: DTensor placements {placements} on a {t.device_mesh.ndim}-D mesh; run "
                                  f"checkpoints support FSDP2's Shard(0) on a 1-D mesh (and replicated tensors)")
    shape = tuple(t.shape)
    local_shape, offset = compute_local_shape_and_global_offset(shape, t.device_mesh, placements)
    row = math.prod(shape[1:])
    start = offset[0] * row if local.numel() else 0
    assert tuple(local.shape) == tuple(local_shape) and local.is_contiguous(), (name, local.shape, local_shape)
    return Holding(name, shape, t.dtype, start, start + local.numel(), local.view(-1), replicated=False)


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by its state_dict name (live tensors, not copies)."""
    out = {}
    for fqn, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            raise NotImplementedError(f"{fqn}: module extra state ({type(t).__name__}) is not saved in run "
                                      "checkpoints")
        out[fqn] = t
    return out


def model_holdings(module: torch.nn.Module) -> list[Holding]:
    return [tensor_holding(layout.model_name(fqn), t) for fqn, t in state_tensors(module).items()]
