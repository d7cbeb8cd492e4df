"""The asynchronous save: training waits for a snapshot; a background thread writes and commits.

    writer = AsyncWriter(group)            # group: a gloo group of its own, made on every rank
    prepared = save.prepare(run_dir, name, adapter, ..., group=group)   # foreground, every rank
    writer.submit(prepared, info=..., keep_last=...)                    # snapshot, then returns
    ...                                    # training goes on; the next step may change the tensors
    writer.wait()                          # the SaveResult after the commit, or the failure raised

What is the same as a synchronous save: everything after the snapshot. The thread runs
`save.write` (the same streaming writer, hashes, fsyncs, the same agreed failures, rank 0's
commit: manifest last, rename, then keep_last rotation), so there is one format and one
commit protocol; a kill -9 at any moment leaves a `.tmp-*` folder that is never complete and
that the next resume removes.

Why a group of its own: the thread's collectives (the records, the outcome) run while the
training thread runs its own; two threads must not issue collectives on one process group
(their order would differ between ranks). torch asks the same of `dcp.async_save`.

Memory: the snapshot is ONE host buffer of this rank's shard (its own holdings plus its share
of the replicated bytes, i.e. what it writes; never the whole state), allocated at the first
save and reused by every later one (grown only if a shard grows). With CUDA it is pinned, so the
device-to-host copies are DMA enqueued on the current stream; the thread waits for them (an
event) before it writes, and the next optimizer step, later on the same stream, cannot change
them. At most one save is in flight: `submit` requires the previous one to be waited for.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Sequence

import torch

from graft.checkpointing.save import Prepared, SaveResult, write

WRITER_NICE = 10
"""The background writer's niceness (0: as training; 19: only idle CPU)."""
_ALIGN = 64
"""Each snapshot piece starts at a multiple of this (any dtype's view of it is aligned)."""


class Snapshot:
    """The reused host buffer the pieces of a save are copied into."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.allocations = 0
        """How many times the buffer was (re)allocated: once, unless a shard grew."""

    @staticmethod
    def size_of(pieces: Sequence[torch.Tensor]) -> int:
        return sum(-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in pieces)

    def take(self, pieces: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Copies of `pieces` in the buffer, and the event to wait for before reading them (device copies)."""
        need = self.size_of(pieces)
        if self.buf is None or self.buf.numel() < need:
            self.buf = None  # the old buffer goes before the new one comes
            self.buf = torch.empty(need, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self.allocations += 1
        out, at, device = [], 0, False
        for t in pieces:
            n = t.numel() * t.element_size()
            dst = self.buf[at: at + n].view(t.dtype)
            device |= t.device.type == "cuda"
            dst.copy_(t.detach().reshape(-1), non_blocking=t.device.type == "cuda")
            out.append(dst)
            at += -(-n // _ALIGN) * _ALIGN
        ready = None
        if device:
            ready = torch.cuda.Event()
            ready.record()
        return out, ready


class AsyncWriter:
    """One rank's background writer; every method is called on every rank, in the same order."""

    def __init__(self, group=None):
        self.group = group
        self.snapshot = Snapshot()
        self._thread: threading.Thread | None = None
        self._result: SaveResult | None = None
        self._error: BaseException | None = None
        self.name: str | None = None
        """The checkpoint in flight (or last waited for)."""

    def submit(self, prepared: Prepared, *, info: dict, keep_last: int | None) -> float:
        """Snapshot `prepared`'s pieces and start writing them; returns the seconds it took (blocked)."""
        assert self._thread is None, "a save is still in flight: wait() first"
        t0 = time.perf_counter()
        data, ready = self.snapshot.take([h.local for h in prepared.pieces])
        self.name = prepared.atomic.name
        self._result = self._error = None
        self._thread = threading.Thread(target=self._run, args=(prepared, data, ready, info, keep_last),
                                        name=f"graft-save-{self.name}", daemon=True)
        self._thread.start()
        return time.perf_counter() - t0

    def _run(self, prepared: Prepared, data, ready, info: dict, keep_last: int | None) -> None:
        try:
            # Training comes first: the writer (and the hashing thread it starts, which inherits
            # this) takes the CPU time training leaves. Linux niceness is per thread.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
            if ready is not None:
                ready.synchronize()
            self._result = write(prepared, info=info, keep_last=keep_last, group=self.group, data=data)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    @property
    def writing(self) -> bool:
        """The thread is still writing or committing."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """A save is in flight (writing, or committed but not yet waited for)."""
        return self._thread is not None

    def failed(self) -> bool:
        """The save in flight has ended with an error (cheap, local: no collective)."""
        return self._thread is not None and not self._thread.is_alive() and self._error is not None

    def wait(self) -> SaveResult | None:
        """Block until the save in flight has committed; its result, None if there was none. Its
        failure is raised here (once: the writer is usable again afterwards)."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        result, error, self._result, self._error = self._result, self._error, None, None
        if error is not None:
            raise error
        return result


__all__ = ["AsyncWriter", "Snapshot"]
