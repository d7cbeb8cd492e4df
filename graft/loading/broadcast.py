"""Distributed load: rank 0 reads the checkpoint, a bounded, pipelined stream broadcasts it.

Called by `graft.load` on every rank of an initialised process group (world size > 1).

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
"""

from __future__ import annotations

import math

import os
import pickle
import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.distributed as dist

from graft._logging import get_logger, progress
from graft.errors import GraftError, PlanError
from graft.loading.formats.base import Checkpoint, Span, TensorMeta, read_spans, spans_are_dense
from graft.loading.plan import Entry, LoadPlan, model_tensors
from graft.loading.plan import plan as make_plan
from graft.loading.transfer import TransferStats, copy_into, load_into

log = get_logger("graft")

Strategy = Literal["broadcast", "every-rank"]
STRATEGIES = ("broadcast", "every-rank")
DEFAULT_BUCKET_MB = 64
# Packed tensors start at multiples of this: any dtype view of a bucket slice is aligned.
_ALIGN = 64
_OK, _FAILED = 1, 2
# Below this, a progress bar is only noise.
_PROGRESS_MIN_BYTES = 256 << 20


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


# -- metadata-only checkpoint: what ranks other than 0 plan against ----------------------


class RemoteCheckpoint(Checkpoint):
    """The metadata rank 0 sent: names, shapes, dtypes. Reads nothing, opens nothing."""

    format = "remote"
    describes = "metadata received from rank 0"

    def __init__(self, path: str, fmt: str, source: str | None, info: dict, metas: dict[str, tuple]):
        # No super().__init__ file checks: this path may not exist on this rank.
        from graft.loading.formats.base import OpenOptions

        super().__init__(path, OpenOptions())
        self.format = fmt  # shadows the class attribute: reports show rank 0's format
        self.source = source
        self._info = info
        self._metas = metas

    @classmethod
    def can_open(cls, path) -> bool:
        return False

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, key: str) -> TensorMeta:
        if self._metas[key] is None:
            raise PlanError(f"{self.path}: this rank's model wants {key!r}, which rank 0's model does not"
                            " (the models differ)")
        shape, dtype, file = self._metas[key]
        return TensorMeta(key, shape, dtype, file)

    def info(self) -> dict:
        return dict(self._info)

    def _materialize(self, key: str) -> torch.Tensor:
        raise GraftError(f"{key!r}: ranks other than 0 never read the checkpoint (internal error)")


def _metadata(ckpt: Checkpoint, plan: LoadPlan) -> dict:
    """Every key name, and the shape/dtype of the keys rank 0's plan looked at (asking a
    sharded reader for the others would open shards the plan never needed)."""
    consulted = {e.ckpt_key for e in plan.entries.values() if e.ckpt_key and e.ckpt_shape is not None}
    metas = {}
    for k in ckpt.keys():
        if k in consulted:
            m = ckpt.meta(k)
            metas[k] = (tuple(m.shape), m.dtype, m.file)
        else:
            metas[k] = None
    return {"path": str(ckpt.path), "format": ckpt.format, "source": ckpt.source, "info": ckpt.info(),
            "metas": metas}


# -- meta-device models -----------------------------------------------------------------


def materialize_meta(model: torch.nn.Module) -> list[str]:
    """Give every meta parameter and buffer real (uninitialised) memory; returns their names.

    Not `Module.to_empty`: it makes a new Parameter per registration, which unties tied
    weights. Here one tensor registered under two names stays one tensor. The memory goes
    to the device of the model's other tensors, else the CPU.
    """
    device = next((t.device for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"),
                  torch.device("cpu"))
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old kept alive, new)
    names = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for slot in (module._parameters, module._buffers):
            for name, t in list(slot.items()):
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device=device)
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    done[id(t)] = (t, new)
                slot[name] = done[id(t)][1]
                names.append(f"{mod_name}.{name}" if mod_name else name)
    return names


# -- the plan every rank must agree on --------------------------------------------------


def _nonpersistent(model: torch.nn.Module, tensors: dict) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n not in tensors}


def _signature(plan: LoadPlan, nonpersistent: dict[str, tuple]) -> dict[str, tuple]:
    sig = {
        k: (e.action, e.ckpt_key, tuple(e.shape), str(e.dtype), e.is_param, e.partial, e.tied_to)
        for k, e in plan.entries.items()
    }
    for n, (shape, dtype) in nonpersistent.items():
        sig[n] = ("buffer", None, tuple(shape), str(dtype), False, False, None)
    return sig


def _describe(sig_entry: tuple | None) -> str:
    if sig_entry is None:
        return "absent"
    action, ck, shape, dtype, _, partial, tied = sig_entry
    what = "partial" if partial else action
    return f"{what} {shape} {dtype.removeprefix('torch.')}" + (f" from {ck!r}" if ck else "")


def _diff(ref: dict, mine: dict, limit: int = 5) -> list[str]:
    out = []
    for k in list(dict.fromkeys([*ref, *mine])):
        if ref.get(k) != mine.get(k):
            out.append(f"{k}: rank 0 {_describe(ref.get(k))}, here {_describe(mine.get(k))}")
            if len(out) >= limit:
                break
    return out


# -- moving exceptions between ranks ------------------------------------------------------


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a GraftError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure means: send the text instead
        return GraftError(f"{type(exc).__name__}: {exc}")


def _raise_remote(exc: BaseException, rank: int):
    exc.add_note(f"(raised on rank {rank} and sent to every rank by graft.load)")
    raise exc


# -- the stream layout --------------------------------------------------------------------


@dataclass
class _Item:
    name: str
    """model key (the destination on every rank)"""
    kind: Literal["ckpt", "rank0"]
    """'ckpt': read from the checkpoint by rank 0; 'rank0': rank 0's own tensor"""
    nbytes: int


@dataclass
class _Piece:
    item: _Item
    item_off: int
    nbytes: int
    msg_off: int


@dataclass
class _Msg:
    """One broadcast: a chunk of one large tensor (`direct`), or many small tensors packed."""

    nbytes: int
    pieces: list[_Piece]
    direct: bool


def _messages(items: list[_Item], capacity: int) -> list[_Msg]:
    """Cut the stream into messages of at most `capacity` bytes.

    Large tensors travel as chunks of their own, received straight into the parameter's
    memory (no bucket, no copy) where the parameter takes the bytes as they are; small
    ones are packed (64-byte aligned) into buckets and copied out.
    """
    threshold = max(_ALIGN, capacity // 4)
    msgs: list[_Msg] = []
    packed: list[_Piece] = []
    pos = 0
    for it in items:
        if it.nbytes >= threshold:
            for off in range(0, it.nbytes, capacity):
                n = min(capacity, it.nbytes - off)
                msgs.append(_Msg(n, [_Piece(it, off, n, 0)], True))
            continue
        start = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
        if start + it.nbytes > capacity:
            msgs.append(_Msg(pos, packed, False))
            packed, start = [], 0
        packed.append(_Piece(it, 0, it.nbytes, start))
        pos = start + it.nbytes
    if packed:
        msgs.append(_Msg(pos, packed, False))
    return msgs


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _comm_device() -> torch.device:
    # nccl moves only CUDA tensors: buckets live on this rank's current device. Any other
    # backend (gloo, or a mixed "cpu:gloo,cuda:nccl") gets CPU buckets. Same code after that.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Stream:
    """Rank 0 fills messages (reading the checkpoint); every rank puts them in place.

    Per message: a 16-byte status (ok / failed: the others stop, the error follows in the
    final step), then the bytes. Rank 0 reads message k+1 while message k is on the wire.
    """

    def __init__(self, model, plan: LoadPlan, items: list[_Item], bucket_bytes: int, rank: int,
                 ckpt: Checkpoint | None, show_progress: bool):
        self.plan, self.rank, self.ckpt = plan, rank, ckpt
        # Two alternating buffers of half the budget each: extra memory stays bucket_mb.
        self.capacity = max(_ALIGN, (bucket_bytes // 2) // _ALIGN * _ALIGN)
        self.msgs = _messages(items, self.capacity)
        self.total = sum(it.nbytes for it in items)
        self.device = _comm_device()
        self.tensors = {k: t.detach() for k, (t, _) in model_tensors(model).items()}
        self.tensors.update({n: b.detach() for n, b in _nonpersistent(model, self.tensors).items()})
        self.staging: dict[str, torch.Tensor] = {}
        self.cached: dict[str, torch.Tensor] = {}  # rank 0: one checkpoint tensor read in parts
        self.show_progress = show_progress
        self.read: list[torch.Tensor] = []
        self.wire: list[torch.Tensor] = []

    def _as_is(self, it: _Item, dest: torch.Tensor) -> bool:
        """Whether the message bytes are exactly `dest`'s bytes (no cast, no reshuffle)."""
        if not dest.is_contiguous():
            return False
        if it.kind == "rank0":
            return True
        e = self.plan.entries[it.name]
        return dest.dtype == e.ckpt_dtype and tuple(dest.shape) == tuple(e.ckpt_shape)

    def _in_place(self, m: _Msg) -> torch.Tensor | None:
        """The destination's own memory, if message `m` can be sent/received right there."""
        if not m.direct:
            return None
        p = m.pieces[0]
        dest = self.tensors[p.item.name]
        if dest.device != self.device or not self._as_is(p.item, dest):
            return None
        if self.rank == 0 and p.item.kind == "ckpt" and dest.device.type != "cpu":
            return None  # files are read into CPU memory first
        return _flat_bytes(dest)[p.item_off:p.item_off + p.nbytes]

    def prepare(self) -> None:
        """Allocate the buffers (before the agreement step, so an allocation failure is shared)."""
        size = max([m.nbytes for m in self.msgs if self._in_place(m) is None] or [0])
        self.status = torch.zeros(2, 2, dtype=torch.int64, device=self.device)  # two alternate
        if not size:
            return
        self.wire = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        if self.rank == 0 and self.device.type != "cpu":
            self.read = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        else:
            self.read = self.wire

    def _buffers(self, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(where rank 0 fills message k, what goes on the wire, in place?)"""
        m = self.msgs[k]
        target = self._in_place(m)
        if target is not None:
            return target, target, True
        return self.read[k % 2][:m.nbytes], self.wire[k % 2][:m.nbytes], False

    # rank 0 -------------------------------------------------------------------------
    def _fill(self, k: int, buf: torch.Tensor, in_place: bool, bar) -> None:
        whole: list[tuple[str, torch.Tensor]] = []
        parts: dict[str, list[tuple[Span, torch.Tensor]]] = {}
        for p in self.msgs[k].pieces:
            dst = buf[p.msg_off:p.msg_off + p.nbytes]
            if p.item.kind == "rank0":
                if not in_place:
                    dst.copy_(_flat_bytes(self.tensors[p.item.name])[p.item_off:p.item_off + p.nbytes])
                continue
            entry = self.plan.entries[p.item.name]
            key = entry.ckpt_key
            span = self.ckpt.span(key)
            if span is not None:
                part = Span(span.file, span.offset + p.item_off, p.nbytes)
                parts.setdefault(span.file, []).append((part, dst))
            elif p.nbytes == p.item.nbytes:
                whole.append((key, dst.view(entry.ckpt_dtype)))
            else:  # no byte range and only a part of it fits: hold one tensor, copy parts
                if key not in self.cached:
                    self.cached = {key: _flat_bytes(self.ckpt.tensor(key).contiguous())}
                dst.copy_(self.cached[key][p.item_off:p.item_off + p.nbytes])
                if p.item_off + p.nbytes == p.item.nbytes:
                    self.cached = {}
        for file, spans in parts.items():
            spans.sort(key=lambda x: x[0].offset)
            self.ckpt.bytes_read += read_spans(file, spans, bar.update, dense=self._dense(file))
        if whole:
            self.ckpt.read_into(whole, on_bytes=bar.update)

    def _dense(self, file: str) -> bool:
        """Read-ahead policy for `file`, decided once from every span the plan reads there:
        each chunk alone looks like a sparse read (a range in the middle of a file), which
        would switch read-ahead off for a load that is in fact sequential."""
        if not hasattr(self, "_density"):
            spans: dict[str, list[Span]] = {}
            for m in self.msgs:
                for p in m.pieces:
                    if p.item.kind == "ckpt":
                        span = self.ckpt.span(self.plan.entries[p.item.name].ckpt_key)
                        if span is not None and p.item_off == 0:
                            spans.setdefault(span.file, []).append(span)
            self._density = {f: spans_are_dense(f, s) for f, s in spans.items()}
        return self._density.get(file, True)

    # every rank --------------------------------------------------------------------
    def _copy_out(self, k: int, buf: torch.Tensor, in_place: bool) -> None:
        if in_place:
            return
        for p in self.msgs[k].pieces:
            it = p.item
            if it.kind == "rank0" and self.rank == 0:
                continue
            src = buf[p.msg_off:p.msg_off + p.nbytes]
            dest = self.tensors[it.name]
            if self._as_is(it, dest):
                _flat_bytes(dest)[p.item_off:p.item_off + p.nbytes].copy_(src)
                continue
            # A cast, a non-contiguous destination: gather the whole tensor, then copy once.
            stage = self.staging.get(it.name)
            if stage is None:
                stage = self.staging[it.name] = torch.empty(it.nbytes, dtype=torch.uint8, device=buf.device)
            stage[p.item_off:p.item_off + p.nbytes].copy_(src)
            if p.item_off + p.nbytes == it.nbytes:
                del self.staging[it.name]
                if it.kind == "ckpt":
                    entry = self.plan.entries[it.name]
                    copy_into(entry, dest, stage.view(entry.ckpt_dtype).view(entry.ckpt_shape))
                else:
                    dest.copy_(stage.view(dest.dtype).view(dest.shape))

    def run(self, before=None) -> BaseException | None:
        """Move every message; returns this rank's failure (or None) for the final agreement.

        `before` runs on rank 0 ahead of the first read; its failure ends the stream like a
        failed read does.
        """
        if not self.msgs:
            if self.rank == 0 and before is not None:
                return _attempt(before)
            return None
        return self._send(before) if self.rank == 0 else self._receive()

    def _post_status(self, ok: bool, k: int):
        status = self.status[k % 2]
        status.copy_(torch.tensor([_OK if ok else _FAILED, k]))
        return dist.broadcast(status, src=0, async_op=True)

    def _send(self, before) -> BaseException | None:
        bar = progress(self.total, "graft broadcast",
                       enabled=self.show_progress and self.total >= _PROGRESS_MIN_BYTES)
        n = len(self.msgs)
        local = None  # a failure copying into rank 0's own model: the stream still completes
        with bar:
            failure = _attempt(before) if before is not None else None
            bufs = self._buffers(0)
            if failure is None:
                failure = _attempt(self._fill_wire, 0, bufs, bar)
            status_work = self._post_status(failure is None, 0)
            for k in range(n):
                status_work.wait()
                if failure is not None:
                    return failure  # the others stop at this status; the error follows at the end
                read_buf, wire_buf, in_place = bufs
                work = dist.broadcast(wire_buf, src=0, async_op=True)
                # While message k is on the wire: read k+1 and announce it, put k into our model.
                if k + 1 < n:
                    bufs = self._buffers(k + 1)
                    failure = _attempt(self._fill_wire, k + 1, bufs, bar)
                    status_work = self._post_status(failure is None, k + 1)
                local = local or _attempt(self._copy_out, k, read_buf, in_place)
                work.wait()
        return local

    def _fill_wire(self, k: int, bufs, bar) -> None:
        read_buf, wire_buf, in_place = bufs
        self._fill(k, read_buf, in_place, bar)
        if wire_buf is not read_buf:
            wire_buf.copy_(read_buf)

    def _receive(self) -> BaseException | None:
        n = len(self.msgs)
        failure = None
        status_work = dist.broadcast(self.status[0], src=0, async_op=True)
        for k in range(n):
            status_work.wait()
            status, seq = self.status[k % 2].tolist()
            if status != _OK:
                return failure  # rank 0 failed; its error comes in the final step
            assert seq == k, f"message {seq} arrived as message {k}"
            _, wire_buf, in_place = self._buffers(k)
            work = dist.broadcast(wire_buf, src=0, async_op=True)
            if k + 1 < n:  # rank 0 announces k+1 as soon as it is read, while k is on the wire
                status_work = dist.broadcast(self.status[(k + 1) % 2], src=0, async_op=True)
            work.wait()
            if failure is None:
                failure = _attempt(self._copy_out, k, wire_buf, in_place)
        return failure


def _attempt(fn, *args) -> BaseException | None:
    """Run `fn`; return its exception instead of raising (it must reach every rank first)."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure must reach every rank
        return e
    return None


# -- the two strategies -------------------------------------------------------------------


def _items(plan: LoadPlan, ckpt_order: Sequence[str], tensors: dict, nonpersistent: Sequence[str],
           with_ckpt: bool) -> list[_Item]:
    items = []
    if with_ckpt:
        for mk in ckpt_order:
            e = plan.entries[mk]
            items.append(_Item(mk, "ckpt", _nbytes(e.ckpt_shape, e.ckpt_dtype)))
    for mk, e in plan.entries.items():
        if e.action != "load":  # new, mismatched, partial: every rank gets rank 0's values
            items.append(_Item(mk, "rank0", _nbytes(e.shape, e.dtype)))
    for n in nonpersistent:
        t = tensors[n]
        items.append(_Item(n, "rank0", t.numel() * t.element_size()))
    return [it for it in items if it.nbytes]


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _planned(plan: LoadPlan) -> list[Entry]:
    """Entries whose bytes come from the checkpoint as whole tensors (the stream's first part)."""
    return [e for e in plan.entries.values() if e.reads_whole]


def _read_order(plan: LoadPlan, ckpt: Checkpoint) -> list[str]:
    """Model keys of the loaded tensors, in the order their bytes lie in the files."""
    keyed = []
    for i, e in enumerate(_planned(plan)):
        span = ckpt.span(e.ckpt_key)
        keyed.append(((0, span.file, span.offset) if span else (1, "", i), e.model_key))
    return [mk for _, mk in sorted(keyed)]


def _check_rank0_meta(plan: LoadPlan, materialized: list[str], nonpersistent: Sequence[str]):
    filled = {k for k, e in plan.entries.items() if e.action == "load"}
    empty = [n for n in materialized if n not in filled]
    if empty:
        raise PlanError(
            f"{plan.path}: rank 0's model has {len(empty)} tensor(s) on the meta device that the"
            f" checkpoint does not fill, e.g. {empty[:3]}; rank 0's values are what every rank gets"
            "\n  way out: build the model on a real device on rank 0 (meta is fine on the other ranks)"
        )


def _local_plan(model, meta: dict, plan_kwargs: dict) -> LoadPlan:
    remote = RemoteCheckpoint(meta["path"], meta["format"], meta["source"], meta["info"], meta["metas"])
    return make_plan(model, remote, **plan_kwargs)


def _agree(problem: str | None, rank: int, world: int, what: str) -> None:
    """Every rank states its problem (or None); if any has one, every rank raises it."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, problem)
    bad = [(r, p) for r, p in enumerate(gathered) if p is not None]
    if bad:
        lines = "\n".join(f"  rank {r}: {p}" for r, p in bad)
        raise PlanError(
            f"{what} differs across ranks:\n{lines}\n  way out: build the same model and call"
            " graft.load with the same arguments on every rank"
        )


def distributed_load(
    model: torch.nn.Module,
    ckpt: Checkpoint | str | os.PathLike | None,
    *,
    open_fn,
    plan_kwargs: dict,
    strategy: Strategy = "broadcast",
    bucket_mb: float = DEFAULT_BUCKET_MB,
    show_progress: bool = True,
    settings: dict | None = None,
) -> tuple[LoadPlan, TransferStats]:
    """The distributed half of `graft.load`: every rank calls it; returns rank 0's plan and stats."""
    start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()

    # 1. Same call everywhere: a rank taking another strategy would wait in another collective.
    mine = repr({"strategy": strategy, "bucket_mb": bucket_mb, **plan_kwargs, **(settings or {})})
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if any(g != gathered[0] for g in gathered):
        differ = [r for r, g in enumerate(gathered) if g != gathered[0]]
        raise GraftError(f"graft.load was called with other arguments on rank(s) {differ} than on rank 0:"
                         f"\n  rank 0: {gathered[0]}\n  rank {differ[0]}: {gathered[differ[0]]}"
                         "\n  way out: pass the same strategy, bucket_mb, freeze and plan options on every rank")
    # Checked after the exchange above, so a bad value fails on every rank alike.
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose one of {STRATEGIES}")
    if not (isinstance(bucket_mb, (int, float)) and bucket_mb > 0):
        raise ValueError(f"bucket_mb={bucket_mb!r}; it must be a positive number of megabytes")

    if strategy == "broadcast":
        plan, stats = _broadcast(model, ckpt, rank, world, open_fn, plan_kwargs, bucket_mb, show_progress, start)
    else:
        plan, stats = _every_rank(model, ckpt, rank, world, open_fn, plan_kwargs, bucket_mb, show_progress, start)
    if rank == 0:
        seconds = time.perf_counter() - start
        log.info(f"graft: {strategy} load over {world} ranks: {stats.bytes_read / 1e6:.1f} MB read on rank 0"
                 f" in {seconds:.2f} s")
    return plan, stats


def _open_and_plan(model, ckpt, open_fn, plan_kwargs, rank0_rules: bool):
    own = not isinstance(ckpt, Checkpoint)
    opened = open_fn(ckpt) if own else ckpt
    try:
        materialized = materialize_meta(model)
        plan = make_plan(model, opened, **plan_kwargs)
        tensors = model_tensors(model)
        nonpersistent = _nonpersistent(model, tensors)
        if rank0_rules:
            _check_rank0_meta(plan, materialized, list(nonpersistent))
        opened.validate(e.ckpt_key for e in plan.entries.values() if e.reads_bytes)
    except BaseException:
        if own:
            opened.close()
        raise
    return opened, own, plan, nonpersistent


def _shapes(buffers: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {n: (tuple(b.shape), b.dtype) for n, b in buffers.items()}


def _finish(local: BaseException | None, stats: tuple | None, rank: int, world: int) -> tuple:
    """Last step on every rank: any rank's failure is raised everywhere; else rank 0's figures."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (_portable(local) if local else None, stats))
    failed = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
    if failed:
        r, exc = failed[0]
        if r == rank and local is not None:
            raise local
        _raise_remote(exc, r)
    return gathered[0][1]


def _broadcast(model, ckpt, rank, world, open_fn, plan_kwargs, bucket_mb, show_progress, start):
    opened = None
    own = False
    try:
        # 2. Rank 0 opens, plans and checks; the others learn the outcome from one message.
        if rank == 0:
            try:
                if ckpt is None:
                    raise ValueError("rank 0 needs the checkpoint: pass its path or a Checkpoint")
                opened, own, plan, nonpersistent = _open_and_plan(model, ckpt, open_fn, plan_kwargs, True)
                status = {"ok": True, "meta": _metadata(opened, plan), "plan": plan,
                          "nonpersistent": _shapes(nonpersistent), "order": _read_order(plan, opened)}
            except Exception as e:  # noqa: BLE001 - every failure must reach every rank
                dist.broadcast_object_list([{"ok": False, "error": _portable(e)}], src=0)
                raise
            dist.broadcast_object_list([status], src=0)
        else:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            status = box[0]
            if not status["ok"]:
                _raise_remote(status["error"], 0)
        plan: LoadPlan = status["plan"]

        # 3. Every rank plans its own model from the metadata; all must match rank 0. The
        #    stream's buffers are allocated here too, so a failure there is shared as well.
        problem = None
        stream = None
        try:
            if rank != 0:
                materialize_meta(model)
                mine = _local_plan(model, status["meta"], plan_kwargs)
                diff = _diff(_signature(plan, status["nonpersistent"]),
                             _signature(mine, _shapes(_nonpersistent(model, model_tensors(model)))))
                problem = "; ".join(diff) if diff else None
            if problem is None:
                tensors = {k: t for k, (t, _) in model_tensors(model).items()}
                tensors.update(_nonpersistent(model, tensors))
                items = _items(plan, status["order"], tensors, list(status["nonpersistent"]), with_ckpt=True)
                stream = _Stream(model, plan, items, int(bucket_mb * 2**20), rank, opened, show_progress)
                stream.prepare()
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            problem = f"{type(e).__name__}: {e}"
        _agree(problem, rank, world, "the model (or its plan)")

        # 4. The stream. Rank 0 first copies partial (overlap) tensors: its values are sent.
        def partial_copies():
            for e in plan.entries.values():
                if e.partial:
                    copy_into(e, tensors[e.model_key].detach(), opened.tensor(e.ckpt_key))

        with torch.no_grad():
            local = stream.run(before=partial_copies)
        # 5. Any failure reaches every rank; else rank 0's figures, so every report is equal.
        figures = (opened.bytes_read, time.perf_counter() - start) if rank == 0 else None
        bytes_read, seconds = _finish(local, figures, rank, world)
    finally:
        if own and opened is not None:
            opened.close()
    return plan, TransferStats(bytes_read, seconds)


def _every_rank(model, ckpt, rank, world, open_fn, plan_kwargs, bucket_mb, show_progress, start):
    opened = None
    own = False
    try:
        error = None
        sent = None
        try:
            if ckpt is None:
                raise ValueError("strategy='every-rank' needs the checkpoint on every rank")
            opened, own, plan, nonpersistent = _open_and_plan(model, ckpt, open_fn, plan_kwargs, rank == 0)
            sig = _signature(plan, _shapes(nonpersistent))
            sent = (plan, _shapes(nonpersistent)) if rank == 0 else None
        except Exception as e:  # noqa: BLE001 - every failure must reach every rank
            error = _portable(e)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (error, sent))
        failed = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
        if failed:
            r, exc = failed[0]
            if r == rank:
                raise error
            _raise_remote(exc, r)
        ref_plan, ref_np = gathered[0][1]
        stream = None
        problem = None
        try:
            tensors = {k: t for k, (t, _) in model_tensors(model).items()}
            tensors.update(nonpersistent)
            items = _items(plan, [], tensors, list(nonpersistent), with_ckpt=False)
            stream = _Stream(model, plan, items, int(bucket_mb * 2**20), rank, opened, show_progress)
            stream.prepare()
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            problem = f"{type(e).__name__}: {e}"
        diff = _diff(_signature(ref_plan, ref_np), sig) if rank != 0 else []
        _agree("; ".join(diff) if diff else problem, rank, world, "the model (or its plan)")

        # Each rank reads its own copy; then rank 0's values of everything else are sent.
        local = None
        figures = None
        try:
            stats = load_into(model, plan, opened, show_progress=show_progress)
            figures = (stats.bytes_read, time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - the stream below must still run on every rank
            local = e
        with torch.no_grad():
            local = stream.run() or local
        bytes_read, seconds = _finish(local, figures if rank == 0 else None, rank, world)
    finally:
        if own and opened is not None:
            opened.close()
    return ref_plan, TransferStats(bytes_read, seconds)
