"""The torch.save file format, written streamed: a zip of `data.pkl` plus one record per storage.

`torch.save` needs every tensor in memory. Its format does not: the pickle only refers to
storages by key, so it is built from metadata (`_rebuild_tensor_v2` over a typed storage,
or `_rebuild_tensor_v3` over bytes for dtypes without a legacy storage class: the globals
`torch.load(weights_only=True)` accepts), then each storage is streamed into its own
uncompressed record, aligned to 64 bytes as torch aligns them (so `mmap=True` works).
Records follow torch's order: data.pkl, .format_version, .storage_alignment, byteorder,
data/0..N, version, .data/serialization_id. Python's zipfile writes the headers, CRCs and
zip64 records (models over 4 GiB); it seeks back to patch each header, so nothing is held.

`TorchZip` is also how the DCP writer stores each tensor inside its `.distcp` file.
"""

from __future__ import annotations

import io
import math
import pickle
import secrets
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Iterable

import torch
import torch._utils
import torch.storage

from graft.conversion.select import OutTensor
from graft.conversion.staging import fsync_file, write_all
from graft.conversion.stream import TensorStream
from graft.conversion.writers import OneFileWriter

_ALIGN = 64
_LOCAL_HEADER = 30
_ZIP64_EXTRA = 20  # what zipfile appends to a local header when it writes zip64 sizes


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, nbytes: int):
        self.key, self.dtype, self.nbytes = key, dtype, nbytes


class _TensorRef:
    """Pickles exactly as torch.save pickles a contiguous CPU tensor that owns its storage."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        args = (self.storage, 0, self.shape, stride, False, OrderedDict())
        if self.storage.dtype in torch.storage._dtype_to_storage_type_map():
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v3, (*args, self.storage.dtype)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        names = torch.storage._dtype_to_storage_type_map()
        if obj.dtype in names:
            return ("storage", getattr(torch, names[obj.dtype]), obj.key, "cpu", obj.nbytes // obj.dtype.itemsize)
        return ("storage", torch.storage.UntypedStorage, obj.key, "cpu", obj.nbytes)


def pickled(obj) -> bytes:
    """`data.pkl` for `obj`, a `_TensorRef` or a dict of them (protocol 2, as torch.save)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def tensor_ref(key: str, out: OutTensor) -> _TensorRef:
    return _TensorRef(_Storage(key, out.dtype, out.nbytes), out.shape)


class _Window(io.RawIOBase):
    """The file seen from `f`'s current position: zip offsets relative to where the zip starts
    (a DCP file holds one zip per tensor, each read back on its own)."""

    def __init__(self, f: BinaryIO):
        self.f, self.base = f, f.tell()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.f.write(b)

    def tell(self) -> int:
        return self.f.tell() - self.base

    def seek(self, pos: int, whence: int = 0) -> int:
        base = self.base if whence == io.SEEK_SET else 0
        return self.f.seek(pos + base, whence) - self.base

    def flush(self) -> None:
        self.f.flush()


class TorchZip:
    """Writes one torch.save archive at `f`'s current position, record by record."""

    def __init__(self, f: BinaryIO, archive: str = "archive"):
        self.window = _Window(f)
        self.zip = zipfile.ZipFile(self.window, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.archive = archive

    def record(self, name: str, chunks: Iterable[memoryview] | bytes, size: int | None = None) -> None:
        if isinstance(chunks, bytes):
            chunks, size = [memoryview(chunks)], len(chunks)
        info = zipfile.ZipInfo(f"{self.archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule; its header grows by 20 bytes
        header = _LOCAL_HEADER + len(info.filename.encode()) + (_ZIP64_EXTRA if zip64 else 0) + 4
        pad = -(self.window.tell() + header) % _ALIGN
        # torch pads with an extra field the same way ("FB" + length + filler bytes).
        info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        with self.zip.open(info, "w", force_zip64=zip64) as w:
            written = write_all(w, chunks)
        if written != size:
            raise AssertionError(f"{name}: wrote {written} bytes, expected {size}")

    def write_archive(self, obj, storages: Iterable[Iterable[memoryview]], sizes: list[int]) -> None:
        """The whole archive: `obj`'s pickle, then storage i's chunks as data/i, then the trailer."""
        try:
            self.record("data.pkl", pickled(obj))
            self.record(".format_version", b"1")
            self.record(".storage_alignment", str(_ALIGN).encode())
            self.record("byteorder", b"little")
            for i, (chunks, size) in enumerate(zip(storages, sizes)):
                self.record(f"data/{i}", chunks, size)
            self.record("version", b"3\n")
            self.record(".data/serialization_id", "".join(str(secrets.randbelow(10)) for _ in range(40)).encode())
            self.zip.close()
        except BaseException:
            # The output is thrown away (full disk, bad source): drop the archive without
            # ZipFile trying to finish it later, from __del__, on a file already closed.
            self.zip.fp = None
            raise


class TorchWriter(OneFileWriter):
    target = "torch"
    def write(self, tmp: Path, stream: TensorStream) -> None:
        state = {t.name: tensor_ref(str(i), t) for i, t in enumerate(self.tensors)}
        with open(tmp, "wb") as f:
            TorchZip(f).write_archive(state, (chunks for _, chunks in stream.tensors(self.tensors)),
                                      [t.nbytes for t in self.tensors])
            fsync_file(f)
