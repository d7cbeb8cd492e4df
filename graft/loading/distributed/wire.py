"""The stream's layout: what travels (items), cut into broadcasts (messages), and where it lands."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.distributed as dist

from graft.loading.plan import LoadPlan, model_tensors

# Packed tensors start at multiples of this: any dtype view of a bucket slice is aligned.
ALIGN = 64


@dataclass
class Item:
    name: str
    """model key (the destination on every rank)"""
    kind: Literal["ckpt", "rank0"]
    """'ckpt': read from the checkpoint by rank 0; 'rank0': rank 0's own tensor"""
    nbytes: int


@dataclass
class Piece:
    item: Item
    item_off: int
    nbytes: int
    msg_off: int


@dataclass
class Msg:
    """One broadcast: a chunk of one large tensor (`direct`), or many small tensors packed."""

    nbytes: int
    pieces: list[Piece]
    direct: bool


@dataclass
class Destinations:
    """Every model tensor the stream may fill, detached, built once per load (after meta
    tensors got their memory): the state dict's, then the non-persistent buffers, which no
    checkpoint holds but whose rank-0 values every rank must end with too."""

    tensors: dict[str, torch.Tensor]
    buffers: dict[str, tuple[tuple[int, ...], torch.dtype]]
    """The non-persistent buffers: name -> (shape, dtype), what ranks compare."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> Destinations:
        tensors = {k: t.detach() for k, (t, _) in model_tensors(model).items()}
        extra = {n: b.detach() for n, b in model.named_buffers() if n not in tensors}
        tensors.update(extra)
        return cls(tensors, {n: (tuple(b.shape), b.dtype) for n, b in extra.items()})


def stream_items(plan: LoadPlan, ckpt_order: Sequence[str], buffers: dict[str, tuple]) -> list[Item]:
    """What the stream carries, in order: the checkpoint tensors rank 0 reads (`ckpt_order`,
    empty when every rank reads for itself), then rank 0's values of every model tensor the
    checkpoint does not fill in full, and of the non-persistent `buffers`.

    Sizes come from rank 0's plan and buffers alone, so every rank cuts the same messages.
    """
    items = []
    for mk in ckpt_order:
        e = plan.entries[mk]
        items.append(Item(mk, "ckpt", _nbytes(e.ckpt_shape, e.ckpt_dtype)))
    for mk, e in plan.entries.items():
        if e.action != "load":  # new, mismatched, partial: every rank gets rank 0's values
            items.append(Item(mk, "rank0", _nbytes(e.shape, e.dtype)))
    for n, (shape, dtype) in buffers.items():
        items.append(Item(n, "rank0", _nbytes(shape, dtype)))
    return [it for it in items if it.nbytes]


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def messages(items: list[Item], capacity: int) -> list[Msg]:
    """Cut the stream into messages of at most `capacity` bytes.

    Large tensors travel as chunks of their own, received straight into the parameter's
    memory (no bucket, no copy) where the parameter takes the bytes as they are; small
    ones are packed (64-byte aligned) into buckets and copied out.
    """
    threshold = max(ALIGN, capacity // 4)
    msgs: list[Msg] = []
    packed: list[Piece] = []
    pos = 0
    for it in items:
        if it.nbytes >= threshold:
            for off in range(0, it.nbytes, capacity):
                n = min(capacity, it.nbytes - off)
                msgs.append(Msg(n, [Piece(it, off, n, 0)], True))
            continue
        start = (pos + ALIGN - 1) // ALIGN * ALIGN
        if start + it.nbytes > capacity:
            msgs.append(Msg(pos, packed, False))
            packed, start = [], 0
        packed.append(Piece(it, 0, it.nbytes, start))
        pos = start + it.nbytes
    if packed:
        msgs.append(Msg(pos, packed, False))
    return msgs


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def comm_device() -> torch.device:
    # nccl moves only CUDA tensors: buckets live on this rank's current device. Any other
    # backend (gloo, or a mixed "cpu:gloo,cuda:nccl") gets CPU buckets. Same code after that.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
