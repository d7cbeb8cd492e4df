"""Read the selected tensors through one reusable buffer, as byte chunks ready to write.

Memory is bounded by construction: one arena of `largest tensor + buffer_bytes` is
allocated once and used as a ring. A reader thread fills it with batches of consecutive
tensors (one `read_into` per batch, so a reader groups its file I/O) while the writer
drains earlier ones, so reading the source overlaps writing the output; a batch waits for
space, never for more memory. Each tensor is handed out as chunks viewing the arena. A
dtype change is done chunk by chunk into a small second buffer, so casting never needs a
second copy of a tensor. Peak extra memory: the arena plus the cast buffer, whatever the
model's size.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Callable, Iterator, Sequence

import torch

from graft.conversion.select import OutTensor
from graft.loading.formats.base import Checkpoint
from graft.loading.formats.reading import writable_buffer

DEFAULT_BUFFER_BYTES = 64 << 20
CAST_CHUNK_BYTES = 16 << 20
_ALIGN = 64  # every tensor's view starts here, so any dtype can view the arena


def _aligned(n: int) -> int:
    return max(_ALIGN, (n + _ALIGN - 1) // _ALIGN * _ALIGN)


Chunks = Iterator[memoryview]


class _Ring:
    """Contiguous regions of [0, capacity), allocated and freed first-in first-out."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.regions: deque[tuple[int, int]] = deque()
        self.cond = threading.Condition()
        self.stopped = False

    def _fit(self, n: int) -> int | None:
        if not self.regions:
            return 0
        tail, head = self.regions[0][0], self.regions[-1][1]
        if head > tail:  # in use: [tail, head); free: [head, capacity) and [0, tail)
            return head if self.capacity - head >= n else (0 if tail >= n else None)
        return head if tail - head >= n else None  # wrapped: free is [head, tail)

    def alloc(self, n: int) -> int | None:
        """The start of a free region of n bytes, waiting for one; None once stopped."""
        with self.cond:
            while not self.stopped and (start := self._fit(n)) is None:
                self.cond.wait()
            if self.stopped:
                return None
            self.regions.append((start, start + n))
            return start

    def free(self) -> None:
        with self.cond:
            self.regions.popleft()
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class TensorStream:
    """`for out, chunks in stream.tensors(order)`: each tensor's output bytes, in `order`.

    The chunks of one tensor are valid only until the next tensor is asked for (they view
    the reusable arena): a writer writes them before moving on.
    """

    def __init__(self, ckpt: Checkpoint, tensors: Sequence[OutTensor], buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 on_bytes: Callable[[int], None] | None = None):
        self.ckpt = ckpt
        sizes = [_aligned(t.source_nbytes) for t in tensors]
        # The largest tensor plus one buffer (never more than the whole selection): with only the
        # largest tensor's room, reading the next tensor would wait for the current one's write,
        # and reading and writing would take turns instead of overlapping.
        self.capacity = min(max(sizes, default=0) + _aligned(buffer_bytes), sum(sizes))
        casts = [t for t in tensors if t.cast]
        self.cast_capacity = min(CAST_CHUNK_BYTES, max((t.nbytes for t in casts), default=0))
        self.on_bytes = on_bytes
        self._arena: torch.Tensor | None = None
        self._cast: torch.Tensor | None = None

    @property
    def peak_bytes(self) -> int:
        """The extra memory this stream ever holds: the arena plus the cast buffer."""
        return self.capacity + self.cast_capacity

    def _batches(self, order: Sequence[OutTensor]) -> Iterator[tuple[list[OutTensor], int]]:
        # A quarter of the arena per batch: the reader can run a few batches ahead of the writer.
        limit = max(self.capacity // 4, _ALIGN)
        batch, used = [], 0
        for out in order:
            size = _aligned(out.source_nbytes)
            if batch and used + size > limit:
                yield batch, used
                batch, used = [], 0
            batch.append(out)
            used += size
        if batch:
            yield batch, used

    def _read(self, order: Sequence[OutTensor], ring: _Ring, ready: queue.Queue) -> None:
        """The reader thread: each batch into the ring, then onto `ready` (an exception too)."""
        try:
            for batch, size in self._batches(order):
                start = ring.alloc(size)
                if start is None:
                    return
                views, offset = [], start
                for out in batch:
                    raw = self._arena[offset: offset + out.source_nbytes]
                    views.append(raw.view(out.source_dtype).view(out.shape) if out.source_nbytes else
                                 torch.empty(out.shape, dtype=out.source_dtype))
                    offset += _aligned(out.source_nbytes)
                self.ckpt.read_into([(out.source_key, v) for out, v in zip(batch, views)], on_bytes=self.on_bytes)
                ready.put((batch, views))
            ready.put(None)
        except BaseException as e:  # noqa: BLE001 - raised again in the writer's thread
            ready.put(e)

    def tensors(self, order: Sequence[OutTensor]) -> Iterator[tuple[OutTensor, Chunks]]:
        if self._arena is None:
            self._arena = torch.empty(self.capacity, dtype=torch.uint8)
        ring, ready = _Ring(self.capacity), queue.Queue()
        reader = threading.Thread(target=self._read, args=(order, ring, ready), name="graft-convert-read",
                                  daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                for out, view in zip(*item):
                    yield out, (self._cast_chunks(out, view) if out.cast else iter([writable_buffer(view)]))
                ring.free()
        finally:
            # The writer is done or failed: stop the reader wherever it is and wait for it,
            # so no read lands in the arena after this returns.
            ring.stop()
            reader.join()

    def _cast_chunks(self, out: OutTensor, view: torch.Tensor) -> Chunks:
        if self._cast is None:
            self._cast = torch.empty(self.cast_capacity, dtype=torch.uint8)
        flat = view.reshape(-1)
        step = max(1, self.cast_capacity // out.dtype.itemsize)
        target = self._cast[: step * out.dtype.itemsize].view(out.dtype)
        for start in range(0, flat.numel(), step):
            n = min(step, flat.numel() - start)
            target[:n].copy_(flat[start: start + n])
            yield writable_buffer(target[:n])
