"""The pipelined stream: rank 0 fills messages (reading the checkpoint); every rank puts them in place.

Per message: a 16-byte status (ok / failed: the others stop, the error follows in the
final step), then the bytes. Rank 0 reads message k+1 while message k is on the wire.
Large tensors are sent from / received into the parameters' own memory where the bytes
need no cast; the rest goes through two alternating buffers of half the bucket each, so
the extra memory on every rank stays `bucket_mb`.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.distributed as dist

from graft._logging import progress
from graft.loading.distributed.wire import ALIGN, Destinations, Item, Msg, comm_device, flat_bytes, messages
from graft.loading.formats.base import Checkpoint
from graft.loading.formats.reading import Span, read_spans, spans_are_dense
from graft.loading.plan import LoadPlan
from graft.loading.transfer import LoadContext, copy_into

_OK, _FAILED = 1, 2
# Below this, a progress bar is only noise.
_PROGRESS_MIN_BYTES = 256 << 20


def attempt(fn, *args) -> BaseException | None:
    """Run `fn`; return its exception instead of raising (it must reach every rank first)."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure must reach every rank
        return e
    return None


class Stream:
    """One load's messages and buffers, allocated here, before the agreement step, so that
    an allocation failure is shared like any other problem.

    plan: rank 0's plan. ckpt: what rank 0 reads the checkpoint tensors from (and first
    copies the partial, overlap, tensors from, since its values of those are sent); None
    when every rank reads the checkpoint itself and only rank 0's values of the rest travel.
    """

    def __init__(self, items: list[Item], *, plan: LoadPlan, dests: Destinations, ckpt: Checkpoint | None,
                 ctx: LoadContext):
        self.plan, self.rank, self.ckpt = plan, ctx.rank, ckpt
        self.tensors = dests.tensors
        self.show_progress = ctx.show_progress
        # Two alternating buffers of half the budget each: extra memory stays bucket_mb.
        self.capacity = max(ALIGN, (int(ctx.bucket_mb * 2**20) // 2) // ALIGN * ALIGN)
        self.msgs = messages(items, self.capacity)
        self.total = sum(it.nbytes for it in items)
        self.device = comm_device()
        self.staging: dict[str, torch.Tensor] = {}
        self.cached: dict[str, torch.Tensor] = {}  # rank 0: one checkpoint tensor read in parts
        self.status = torch.zeros(2, 2, dtype=torch.int64, device=self.device)  # two alternate
        size = max([m.nbytes for m in self.msgs if self._in_place(m) is None] or [0])
        self.wire = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)] if size else []
        if size and self.rank == 0 and self.device.type != "cpu":
            self.read = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        else:
            self.read = self.wire

    def _as_is(self, it: Item, dest: torch.Tensor) -> bool:
        """Whether the message bytes are exactly `dest`'s bytes (no cast, no reshuffle)."""
        if not dest.is_contiguous():
            return False
        if it.kind == "rank0":
            return True
        e = self.plan.entries[it.name]
        return dest.dtype == e.ckpt_dtype and tuple(dest.shape) == tuple(e.ckpt_shape)

    def _in_place(self, m: Msg) -> torch.Tensor | None:
        """The destination's own memory, if message `m` can be sent/received right there."""
        if not m.direct:
            return None
        p = m.pieces[0]
        dest = self.tensors[p.item.name]
        if dest.device != self.device or not self._as_is(p.item, dest):
            return None
        if self.rank == 0 and p.item.kind == "ckpt" and dest.device.type != "cpu":
            return None  # files are read into CPU memory first
        return flat_bytes(dest)[p.item_off:p.item_off + p.nbytes]

    def _buffers(self, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(where rank 0 fills message k, what goes on the wire, in place?)"""
        m = self.msgs[k]
        target = self._in_place(m)
        if target is not None:
            return target, target, True
        return self.read[k % 2][:m.nbytes], self.wire[k % 2][:m.nbytes], False

    def run(self) -> BaseException | None:
        """Move every message; returns this rank's failure (or None) for the final agreement.

        A failure on rank 0 before the first read (an overlap copy) ends the stream like a
        failed read does.
        """
        if self.rank != 0:
            return self._receive() if self.msgs else None
        failure = attempt(self._copy_overlaps) if self.ckpt is not None else None
        return self._send(failure) if self.msgs else failure

    # rank 0 -------------------------------------------------------------------------
    def _copy_overlaps(self) -> None:
        for e in self.plan.entries.values():
            if e.partial:
                copy_into(e, self.tensors[e.model_key], self.ckpt.tensor(e.ckpt_key))

    def _fill(self, k: int, buf: torch.Tensor, in_place: bool, bar) -> None:
        whole: list[tuple[str, torch.Tensor]] = []
        parts: dict[str, list[tuple[Span, torch.Tensor]]] = {}
        for p in self.msgs[k].pieces:
            dst = buf[p.msg_off:p.msg_off + p.nbytes]
            if p.item.kind == "rank0":
                if not in_place:
                    dst.copy_(flat_bytes(self.tensors[p.item.name])[p.item_off:p.item_off + p.nbytes])
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
                    self.cached = {key: flat_bytes(self.ckpt.tensor(key).contiguous())}
                dst.copy_(self.cached[key][p.item_off:p.item_off + p.nbytes])
                if p.item_off + p.nbytes == p.item.nbytes:
                    self.cached = {}
        for file, spans in parts.items():
            spans.sort(key=lambda x: x[0].offset)
            self.ckpt.bytes_read += read_spans(file, spans, bar.update, dense=self._density.get(file, True))
        if whole:
            self.ckpt.read_into(whole, on_bytes=bar.update)

    @cached_property
    def _density(self) -> dict[str, bool]:
        """Read-ahead policy per file, decided once from every span the plan reads there:
        each chunk alone looks like a sparse read (a range in the middle of a file), which
        would switch read-ahead off for a load that is in fact sequential."""
        spans: dict[str, list[Span]] = {}
        for m in self.msgs:
            for p in m.pieces:
                if p.item.kind == "ckpt":
                    span = self.ckpt.span(self.plan.entries[p.item.name].ckpt_key)
                    if span is not None and p.item_off == 0:
                        spans.setdefault(span.file, []).append(span)
        return {f: spans_are_dense(f, s) for f, s in spans.items()}

    def _post_status(self, ok: bool, k: int):
        status = self.status[k % 2]
        status.copy_(torch.tensor([_OK if ok else _FAILED, k]))
        return dist.broadcast(status, src=0, async_op=True)

    def _send(self, failure: BaseException | None) -> BaseException | None:
        bar = progress(self.total, "graft broadcast",
                       enabled=self.show_progress and self.total >= _PROGRESS_MIN_BYTES)
        n = len(self.msgs)
        local = None  # a failure copying into rank 0's own model: the stream still completes
        with bar:
            bufs = self._buffers(0)
            if failure is None:
                failure = attempt(self._fill_wire, 0, bufs, bar)
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
                    failure = attempt(self._fill_wire, k + 1, bufs, bar)
                    status_work = self._post_status(failure is None, k + 1)
                local = local or attempt(self._copy_out, k, read_buf, in_place)
                work.wait()
        return local

    def _fill_wire(self, k: int, bufs, bar) -> None:
        read_buf, wire_buf, in_place = bufs
        self._fill(k, read_buf, in_place, bar)
        if wire_buf is not read_buf:
            wire_buf.copy_(read_buf)

    # every rank --------------------------------------------------------------------
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
                failure = attempt(self._copy_out, k, wire_buf, in_place)
        return failure

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
                flat_bytes(dest)[p.item_off:p.item_off + p.nbytes].copy_(src)
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
