"""Streaming safetensors writer: header first, then each tensor's bytes straight from its memory.

`safetensors.torch.save` builds the whole file in memory (one more copy of everything saved)
and `save_file` wants whole, unshared tensors. A shard of a run checkpoint is a list of flat
views into live state, so this writer streams them:

- the header (every piece's dtype, 1-D shape and offsets) is computed from the views alone
  and written first;
- a CPU tensor's bytes go to `os.write` from its own memory, in pieces of `PIECE_BYTES`;
  a GPU (or non-contiguous) tensor is copied in bounded pieces through ONE staging buffer of
  `STAGING_BYTES`, reused for the whole file (pinned when CUDA is there). Extra memory of a
  save: the staging buffer, at most;
- each piece is hashed while it is written (a helper thread: the hasher and `write` both
  release the GIL), so nobody reads the file back to hash it;
- the file is fsynced before it is closed.

The result is an ordinary safetensors file (any safetensors reader opens it).
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from graft.checkpointing.layout import HASH, new_hasher
from graft.loading.formats.reading import writable_buffer
from graft.loading.formats.safetensors_file import DTYPES

PIECE_BYTES = 16 << 20
"""One write call and one hash update: large enough for full-speed syscalls, small enough that
the hash of a piece overlaps its write."""
STAGING_BYTES = 64 << 20
"""The bound on extra memory of a save: device tensors are staged through this much host memory."""

_ST_NAME = {dtype: name for name, dtype in DTYPES.items()}
_ALIGN = 8


@dataclass
class Written:
    """One written file: its size, hash, and the absolute byte offset of each key's data."""

    path: str
    size: int
    hash: str
    algo: str
    offsets: dict[str, int]


def write_bytes(path: str | Path, data: bytes, algo: str = HASH) -> Written:
    """A small file (JSON, YAML), written, fsynced and hashed from memory."""
    path = Path(path)
    with _durable(path) as fd:
        _write_all(fd, memoryview(data), path)
    h = new_hasher(algo)
    h.update(data)
    return Written(str(path), len(data), h.hexdigest(), algo, {})


class _durable:
    """An fd for a new file; fsync (unless `fsync=False`) and close on the way out; write errors name the file."""

    def __init__(self, path: Path, fsync: bool = True):
        self.path = path
        self.fsync = fsync

    def __enter__(self) -> int:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        return self.fd

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and self.fsync:
                try:
                    os.fsync(self.fd)
                except OSError as e:
                    e.filename = e.filename or str(self.path)
                    raise
        finally:
            os.close(self.fd)
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = str(self.path)  # ENOSPC from write/fsync names no file: say which
        return False


def _write_all(fd: int, view: memoryview, path: Path) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


class _Staging:
    """One host buffer reused for every device tensor of a file (allocated on first need)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.buf: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.buf is None:
            pin = torch.cuda.is_available()
            self.buf = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        return self.buf


def _header(items: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    header: dict = {"__metadata__": metadata} if metadata else {}
    rel, at = {}, 0
    for key, t in items:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_NAME[t.dtype], "shape": [t.numel()], "data_offsets": [at, at + n]}
        rel[key] = at
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)  # data starts aligned, as safetensors writes it
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: start + v for k, v in rel.items()}


def write_shard(path: str | Path, items: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                *, algo: str = HASH, staging_bytes: int = STAGING_BYTES, fsync: bool = True) -> Written:
    """Write `items` (key, 1-D tensor) as one safetensors file; fsynced (unless `fsync=False`: a
    staging copy read back at once); hashed while written."""
    path = Path(path)
    for key, t in items:
        assert t.dim() == 1 and t.dtype in _ST_NAME, (key, t.shape, t.dtype)
    head, offsets = _header(items, {k: str(v) for k, v in (metadata or {}).items()})
    hasher = new_hasher(algo)
    staging = _Staging(staging_bytes)
    size = len(head)
    with ThreadPoolExecutor(1, thread_name_prefix="graft-hash") as pool, _durable(path, fsync) as fd:

        def put(view: memoryview) -> None:
            # Hash and write the same bytes at once; the next piece waits for both (the
            # staging buffer is overwritten by it).
            job = pool.submit(hasher.update, view)
            try:
                _write_all(fd, view, path)
            finally:
                job.result()

        put(memoryview(head))
        for key, t in items:
            t = t.detach()
            n = t.numel() * t.element_size()
            size += n
            if n == 0:
                continue
            if t.device.type == "cpu" and t.is_contiguous():
                view = writable_buffer(t)
                for at in range(0, n, PIECE_BYTES):
                    put(view[at: at + PIECE_BYTES])
                continue
            buf = staging.get()
            per = max(1, staging.nbytes // t.element_size())
            for at in range(0, t.numel(), per):
                part = t[at: at + per]
                nb = part.numel() * t.element_size()
                buf[:nb].view(t.dtype).copy_(part)
                view = writable_buffer(buf)[:nb]
                for off in range(0, nb, PIECE_BYTES):
                    put(view[off: off + PIECE_BYTES])
    return Written(str(path), size, hasher.hexdigest(), algo, offsets)
