"""Distributed load: rank 0 reads the checkpoint, a bounded, pipelined stream broadcasts it.

`graft.load` on every rank of an initialised process group (world size > 1) opens, plans
and validates as one process does; the transfer chosen here (`distributed_transfer`) does
the exchanges around that and moves the bytes:

    settings    all_gather_object    every rank called load() the same way (else: hang later)
    status      broadcast_object_list  rank 0: opened, planned, validated -> metadata + plan,
                                       or the error, which every rank then raises
    agreement   all_gather_object    each rank plans its own model from rank 0's metadata
                                       and compares with rank 0's plan
    stream      broadcast (async)    a status, then the bytes, per message: large tensors in
                                       chunks sent from / received into the parameters' own
                                       memory, small ones packed in buckets; rank 0 reads
                                       message k+1 while message k is on the wire; a failed
                                       read sends "failed" and every rank stops
    final       all_gather_object    any rank's failure (read, copy) is raised on every rank;
                                       else rank 0's byte count and time: every report is equal

(strategy="every-rank": the status step is an all_gather of every rank's outcome, each
rank reads its own file, and the stream carries only rank 0's values of the rest.)

Why collectives of our own rather than `set_model_state_dict(broadcast_from_rank0=True)`
(STYLE 7): that path needs the whole state dict in rank 0's memory and sends one tensor
per call; the goal here is extra memory of one bucket on every rank, and the read of the
next bucket overlapping the broadcast of this one.

The stream carries, in this order: every tensor loaded from the checkpoint (in rank 0's
file order, so reads are sequential), then rank 0's own values of every model tensor the
checkpoint does not fill in full (new, mismatched, partially copied) and of the
non-persistent buffers, so all ranks end identical without seeding tricks.

Models built on the `meta` device are materialised before the plan (with ties between
parameters kept), then filled from the stream: loaded tensors get the checkpoint's
values, everything else rank 0's values. Rank 0 itself must hold real values for
everything the checkpoint does not fill.

Modules: agreement (the same call, the same plan, one error on every rank), remote (what
rank 0 sends; the checkpoint stand-in the others plan against), meta (meta-device
models), wire (items, messages, destinations), stream (the pipelined broadcast),
strategies (the two transfers).
"""

from __future__ import annotations

from typing import Literal

import torch.distributed as dist

from graft.loading.distributed.agreement import check_same_call
from graft.loading.distributed.meta import materialize_meta, require_rank0_values
from graft.loading.distributed.strategies import EveryRankRead, Rank0Broadcast
from graft.loading.transfer import LoadContext, Transfer

Strategy = Literal["broadcast", "every-rank"]
STRATEGIES = ("broadcast", "every-rank")
DEFAULT_BUCKET_MB = 64

__all__ = [
    "DEFAULT_BUCKET_MB",
    "STRATEGIES",
    "Strategy",
    "check_strategy",
    "distributed_active",
    "distributed_transfer",
    "materialize_meta",
    "require_rank0_values",
]


def distributed_active(distributed: bool | None) -> bool:
    """Whether `graft.load` should take the distributed path (see its `distributed=`)."""
    if distributed is False:
        return False
    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise ValueError("distributed=True but torch.distributed is not initialised;"
                         " call init_process_group (or start under torchrun / accelerate) first,"
                         " or pass distributed=None to decide by itself")
    return ready and dist.get_world_size() > 1


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose one of {STRATEGIES}")


def distributed_transfer(ctx: LoadContext, strategy: Strategy, *, settings: dict) -> Transfer:
    """The transfer of a distributed `graft.load`, once every rank is known to have called
    it with the same `strategy`, bucket size, plan options and `settings`."""
    check_same_call({"strategy": strategy, "bucket_mb": ctx.bucket_mb, **ctx.plan_kwargs, **settings}, ctx)
    # Checked after the exchange above, so a bad value fails on every rank alike.
    check_strategy(strategy)
    if not (isinstance(ctx.bucket_mb, (int, float)) and ctx.bucket_mb > 0):
        raise ValueError(f"bucket_mb={ctx.bucket_mb!r}; it must be a positive number of megabytes")
    return Rank0Broadcast(ctx) if strategy == "broadcast" else EveryRankRead(ctx)
