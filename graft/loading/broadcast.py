"""Distributed load: rank 0 reads the checkpoint, a bounded, pipelined stream broadcasts it.

Called by `graft.load` on every rank of an initialised process group (world size > 1).

    settings    all_gather_object    every rank called load() the same way (else: hang later)
    status      broadcast_object_list  rank 0: opened, planned, validated -> metadata + plan,
                                       or the error, which every rank then raises
    agreement   all_gather_object    each rank plans its own model from rank 0's metadata
                                       and compares with rank 0's plan
    stream      broadcast (async)    buckets of planned bytes; rank 0 reads bucket k+1 while
                                       bucket k is on the wire; a 64-byte header in each bucket
                                       carries the status, so a failed read ends the stream
                                       with the same error everywhere
    final       broadcast_object_list  rank 0's byte count and time, so every report is equal

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

import os
import pickle
import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.distributed as dist

from graft._logging import get_logger, progress
from graft.errors import CheckpointError, GraftError, PlanError
from graft.loading.formats.base import Checkpoint, Span, TensorMeta, read_spans
from graft.loading.plan import Entry, LoadPlan, model_tensors
from graft.loading.plan import plan as make_plan
from graft.loading.transfer import TransferStats, copy_into, load_into

log = get_logger("graft")

Strategy = Literal["broadcast", "every-rank"]
STRATEGIES = ("broadcast", "every-rank")
DEFAULT_BUCKET_MB = 64
# Each bucket starts with this header: int64 [status, sequence number]. 64 bytes keeps
# every payload offset aligned for any dtype view.
_HEADER = 64
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
        shape, dtype, file = self._metas[key]
        return TensorMeta(key, shape, dtype, file)

    def info(self) -> dict:
        return dict(self._info)

    def _materialize(self, key: str) -> torch.Tensor:
        raise GraftError(f"{key!r}: ranks other than 0 never read the checkpoint (internal error)")


def _metadata(ckpt: Checkpoint) -> dict:
    metas = {}
    for k in ckpt.keys():
        m = ckpt.meta(k)
        metas[k] = (tuple(m.shape), m.dtype, m.file)
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
    start: int = 0


@dataclass
class _Piece:
    item: _Item
    item_off: int
    nbytes: int
    bucket_off: int


def _layout(items: list[_Item], capacity: int) -> tuple[int, list[list[_Piece]]]:
    """Lay the items end to end (aligned) and cut the stream into buckets of `capacity`."""
    pos = 0
    for it in items:
        pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
        it.start = pos
        pos += it.nbytes
    total = pos
    n = (total + capacity - 1) // capacity if total else 0
    buckets: list[list[_Piece]] = [[] for _ in range(n)]
    for it in items:
        off = 0
        while off < it.nbytes:
            k = (it.start + off) // capacity
            b_off = it.start + off - k * capacity
            size = min(it.nbytes - off, capacity - b_off)
            buckets[k].append(_Piece(it, off, size, b_off))
            off += size
    return total, buckets


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _comm_device() -> torch.device:
    # nccl moves only CUDA tensors: buckets live on this rank's current device. Any other
    # backend (gloo, or a mixed "cpu:gloo,cuda:nccl") gets CPU buckets. Same code after that.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Stream:
    """Rank 0 fills buckets; everyone (rank 0 included) copies out of them."""

    def __init__(self, model, plan: LoadPlan, items: list[_Item], bucket_bytes: int, rank: int,
                 ckpt: Checkpoint | None, show_progress: bool):
        self.plan, self.rank, self.ckpt = plan, rank, ckpt
        # Two alternating buffers of half the budget each: extra memory stays bucket_mb.
        capacity = max(_ALIGN, (bucket_bytes // 2 - _HEADER) // _ALIGN * _ALIGN)
        self.total, self.buckets = _layout(items, capacity)
        self.capacity = capacity
        self.device = _comm_device()
        self.tensors = {k: t.detach() for k, (t, _) in model_tensors(model).items()}
        self.tensors.update({n: b.detach() for n, b in _nonpersistent(model, self.tensors).items()})
        self.staging: dict[str, torch.Tensor] = {}
        self.cached: dict[str, torch.Tensor] = {}  # rank 0: one checkpoint tensor split over buckets
        self.show_progress = show_progress

    def _size(self, k: int) -> int:
        return min(self.capacity, self.total - k * self.capacity)

    def _alloc(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        size = _HEADER + min(self.capacity, self.total)
        wire = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        if self.rank == 0 and self.device.type != "cpu":
            read = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        else:
            read = wire
        return read, wire

    # rank 0 -------------------------------------------------------------------------
    def _fill(self, k: int, buf: torch.Tensor, bar) -> None:
        payload = buf[_HEADER:_HEADER + self._size(k)]
        whole: list[tuple[str, torch.Tensor]] = []
        split: dict[str, list[tuple[Span, torch.Tensor]]] = {}
        for p in self.buckets[k]:
            dst = payload[p.bucket_off:p.bucket_off + p.nbytes]
            if p.item.kind == "rank0":
                dst.copy_(_flat_bytes(self.tensors[p.item.name])[p.item_off:p.item_off + p.nbytes])
                continue
            entry = self.plan.entries[p.item.name]
            key = entry.ckpt_key
            if p.nbytes == p.item.nbytes:
                whole.append((key, dst.view(entry.ckpt_dtype)))
                continue
            # A tensor larger than what is left of this bucket: read its bytes in parts.
            span = self.ckpt.span(key)
            if span is not None:
                part = Span(span.file, span.offset + p.item_off, p.nbytes)
                split.setdefault(span.file, []).append((part, dst))
            else:
                if key not in self.cached:
                    self.cached = {key: _flat_bytes(self.ckpt.tensor(key).contiguous())}
                dst.copy_(self.cached[key][p.item_off:p.item_off + p.nbytes])
                if p.item_off + p.nbytes == p.item.nbytes:
                    self.cached = {}
        if whole:
            self.ckpt.read_into(whole, on_bytes=bar.update)
        for file, parts in split.items():
            parts.sort(key=lambda x: x[0].offset)
            self.ckpt.bytes_read += read_spans(file, parts, bar.update)

    # every rank --------------------------------------------------------------------
    def _copy_out(self, k: int, buf: torch.Tensor) -> None:
        payload = buf[_HEADER:_HEADER + self._size(k)]
        for p in self.buckets[k]:
            it = p.item
            if it.kind == "rank0" and self.rank == 0:
                continue
            src = payload[p.bucket_off:p.bucket_off + p.nbytes]
            dest = self.tensors[it.name]
            entry = self.plan.entries.get(it.name)
            if it.kind == "ckpt":
                as_is = (dest.is_contiguous() and dest.dtype == entry.ckpt_dtype
                         and tuple(dest.shape) == tuple(entry.ckpt_shape))
            else:
                as_is = dest.is_contiguous()
            if as_is:
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
                    copy_into(entry, dest, stage.view(entry.ckpt_dtype).view(entry.ckpt_shape))
                else:
                    dest.copy_(stage.view(dest.dtype).view(dest.shape))

    def run(self) -> None:
        if not self.buckets:
            return
        read, wire = self._alloc()
        if self.rank == 0:
            self._send(read, wire)
        else:
            self._receive(wire)

    def _send(self, read, wire) -> None:
        bar = progress(self.total, "graft broadcast",
                       enabled=self.show_progress and self.total >= _PROGRESS_MIN_BYTES)
        n = len(self.buckets)
        with bar:
            failure = self._try_fill(0, read[0], wire[0], bar)
            for k in range(n):
                if failure is not None:
                    self._send_failure(k, wire[k % 2], failure)
                cur = wire[k % 2]
                cur[:16].view(torch.int64).copy_(torch.tensor([_OK, k]))
                work = dist.broadcast(cur[:_HEADER + self._size(k)], src=0, async_op=True)
                # While bucket k is on the wire: read bucket k+1, copy bucket k into our own model.
                if k + 1 < n:
                    failure = self._try_fill(k + 1, read[(k + 1) % 2], wire[(k + 1) % 2], bar)
                self._copy_out(k, read[k % 2])
                work.wait()
            if failure is not None:  # cannot happen (the last fill is bucket n-1), kept for safety
                raise failure

    def _try_fill(self, k, read_buf, wire_buf, bar) -> BaseException | None:
        try:
            self._fill(k, read_buf, bar)
            if wire_buf is not read_buf:
                wire_buf.copy_(read_buf)
        except Exception as e:  # noqa: BLE001 - any read failure must reach every rank
            return e
        return None

    def _send_failure(self, k: int, buf: torch.Tensor, failure: BaseException):
        buf[:16].view(torch.int64).copy_(torch.tensor([_FAILED, k]))
        dist.broadcast(buf[:_HEADER + self._size(k)], src=0)
        dist.broadcast_object_list([_portable(failure)], src=0)
        raise failure

    def _receive(self, wire) -> None:
        n = len(self.buckets)
        pending = None
        for k in range(n):
            cur = wire[k % 2]
            work = dist.broadcast(cur[:_HEADER + self._size(k)], src=0, async_op=True)
            if pending is not None:  # copy bucket k-1 out while bucket k arrives
                self._copy_out(pending, wire[pending % 2])
            work.wait()
            status, seq = cur[:16].view(torch.int64).tolist()
            if status != _OK:
                box = [None]
                dist.broadcast_object_list(box, src=0)
                _raise_remote(box[0], 0)
            assert seq == k, f"bucket {seq} arrived as bucket {k}"
            pending = k
        self._copy_out(pending, wire[pending % 2])


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
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def _planned(plan: LoadPlan) -> list[Entry]:
    """Entries whose bytes come from the checkpoint as whole tensors (the stream's first part)."""
    return [e for e in plan.entries.values() if e.ckpt_key and not e.tied_to and e.action == "load"]


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
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose one of {STRATEGIES}")
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb={bucket_mb!r}; it must be a positive number of megabytes")
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

    if strategy == "broadcast":
        plan, stats = _broadcast(model, ckpt, rank, world, open_fn, plan_kwargs, bucket_mb, show_progress)
    else:
        plan, stats = _every_rank(model, ckpt, rank, world, open_fn, plan_kwargs, bucket_mb, show_progress)
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
        opened.validate(e.ckpt_key for e in plan.entries.values()
                        if e.ckpt_key and not e.tied_to and (e.action == "load" or e.partial))
    except BaseException:
        if own:
            opened.close()
        raise
    return opened, own, plan, nonpersistent


def _broadcast(model, ckpt, rank, world, open_fn, plan_kwargs, bucket_mb, show_progress):
    opened = None
    own = False
    try:
        # 2. Rank 0 opens, plans and checks; the others learn the outcome from one message.
        if rank == 0:
            try:
                if ckpt is None:
                    raise ValueError("rank 0 needs the checkpoint: pass its path or a Checkpoint")
                opened, own, plan, nonpersistent = _open_and_plan(model, ckpt, open_fn, plan_kwargs, True)
                with torch.no_grad():  # rank 0's partial copies, before its values are sent
                    for e in plan.entries.values():
                        if e.partial:
                            copy_into(e, model_tensors(model)[e.model_key][0].detach(), opened.tensor(e.ckpt_key))
                status = {"ok": True, "meta": _metadata(opened), "plan": plan,
                          "nonpersistent": {n: (tuple(b.shape), b.dtype) for n, b in nonpersistent.items()},
                          "order": _read_order(plan, opened)}
            except Exception as e:  # noqa: BLE001 - every failure must reach every rank
                status = {"ok": False, "error": _portable(e)}
                dist.broadcast_object_list([status], src=0)
                raise
            dist.broadcast_object_list([status], src=0)
        else:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            status = box[0]
            if not status["ok"]:
                _raise_remote(status["error"], 0)
        plan: LoadPlan = status["plan"]
        ref = _signature(plan, status["nonpersistent"])

        # 3. Every rank plans its own model from the metadata; all must match rank 0.
        problem = None
        if rank != 0:
            try:
                materialize_meta(model)
                mine = _local_plan(model, status["meta"], plan_kwargs)
                np_mine = {n: (tuple(b.shape), b.dtype)
                           for n, b in _nonpersistent(model, model_tensors(model)).items()}
                diff = _diff(ref, _signature(mine, np_mine))
                problem = "; ".join(diff) if diff else None
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                problem = f"{type(e).__name__}: {e}"
        _agree(problem, rank, world, "the model (or its plan)")

        # 4. The stream.
        tensors = {k: t for k, (t, _) in model_tensors(model).items()}
        tensors.update(_nonpersistent(model, tensors))
        items = _items(plan, status["order"], tensors, list(status["nonpersistent"]), with_ckpt=True)
        stream = _Stream(model, plan, items, int(bucket_mb * 2**20), rank, opened, show_progress)
        with torch.no_grad():
            stream.run()

        # 5. Rank 0's figures, so every rank returns the same report.
        box = [(opened.bytes_read if opened else 0, 0.0)]
        if rank == 0:
            box = [(opened.bytes_read, time.perf_counter() - status.get("t0", 0.0))]
        dist.broadcast_object_list(box, src=0)
    finally:
        if own and opened is not None:
            opened.close()
    bytes_read, _ = box[0]
    return plan, TransferStats(bytes_read, 0.0)


def _every_rank(model, ckpt, rank, world, open_fn, plan_kwargs, bucket_mb, show_progress):
    opened = None
    own = False
    try:
        error = None
        sig = None
        try:
            if ckpt is None:
                raise ValueError("strategy='every-rank' needs the checkpoint on every rank")
            opened, own, plan, nonpersistent = _open_and_plan(model, ckpt, open_fn, plan_kwargs, rank == 0)
            sig = _signature(plan, {n: (tuple(b.shape), b.dtype) for n, b in nonpersistent.items()})
        except Exception as e:  # noqa: BLE001 - every failure must reach every rank
            error = _portable(e)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (error, sig if rank == 0 else None))
        failed = [(r, g[0]) for r, g in enumerate(gathered) if g[0] is not None]
        if failed:
            r, exc = failed[0]
            if r == rank:
                raise error
            _raise_remote(exc, r)
        ref = gathered[0][1]
        diff = _diff(ref, sig) if rank != 0 else []
        _agree("; ".join(diff) if diff else None, rank, world, "the model (or its plan)")

        stats = load_into(model, plan, opened, show_progress=show_progress)
        tensors = {k: t for k, (t, _) in model_tensors(model).items()}
        tensors.update(nonpersistent)
        items = _items(plan, [], tensors, list(nonpersistent), with_ckpt=False)
        stream = _Stream(model, plan, items, int(bucket_mb * 2**20), rank, opened, show_progress)
        with torch.no_grad():
            stream.run()
        box = [(stats.bytes_read, stats.seconds)]
        dist.broadcast_object_list(box, src=0)
    finally:
        if own and opened is not None:
            opened.close()
    return plan if rank == 0 else _same_plan(plan, box), TransferStats(box[0][0], box[0][1])


def _same_plan(plan: LoadPlan, box) -> LoadPlan:
    return plan
