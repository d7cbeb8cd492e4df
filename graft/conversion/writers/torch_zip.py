"""The torch.save file format, written streamed: a zip of `data.pkl` plus one record per storage.

`torch.save` needs every tensor in memory. Its format does not: the pickle only refers to
storages by key, so it is built from metadata (`_rebuild_tensor_v2` over a typed storage,
or `_rebuild_tensor_v3` over bytes for dtypes without a legacy storage class: the globals
`torch.load(weights_only=True)` accepts), then each storage is streamed into its own
uncompressed record, aligned to 64 bytes as torch aligns them (so `mmap=True` works).
Records follow torch's order: data.pkl, .format_version, .storage_alignment, byteorder,
data/0..N, version, .data/serialization_id. `TorchZip` writes the zip records itself (zip64
where a size or offset passes 4 GiB) and patches each CRC in place, so nothing is held.

`TorchZip` is also how the DCP writer stores each tensor inside its `.distcp` file.
"""

from __future__ import annotations

import io
import math
import pickle
import secrets
import struct
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Iterable

import torch
import torch._utils
import torch.storage

try:  # SIMD crc32, same checksums as zlib's (a dependency; zlib only where its wheel is missing)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

from graft.conversion.select import OutTensor
from graft.conversion.staging import fsync_file, write_all
from graft.conversion.stream import TensorStream
from graft.conversion.writers import OneFileWriter

_ALIGN = 64
_LOCAL_HEADER = 30
_MARKER = 0xFFFFFFFF  # a 32-bit field at this value means "see the zip64 extra field"
# Sizes and offsets from here on go in zip64 fields (a test lowers it to check that path).
ZIP64_FROM = 0xFFFFFFFF
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, as torch.save writes it: archives are reproducible


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


class TorchZip:
    """Writes one torch.save archive at `f`'s current position, record by record.

    Our own zip writer rather than Python's zipfile: every record's size is known before
    its first byte, so each local header is final but for the CRC, which is computed as
    the bytes pass (zlib-ng's SIMD crc32, about 5x zlib's: at zlib's speed the checksum
    alone took a third of a conversion's time) and patched in place afterwards. Offsets
    are relative to where the archive starts (a DCP file holds one archive per tensor,
    each read back on its own).
    """

    def __init__(self, f: BinaryIO, archive: str = "archive"):
        self.f, self.base = f, f.tell()
        self.archive = archive
        self.central: list[bytes] = []

    def _tell(self) -> int:
        return self.f.tell() - self.base

    def record(self, name: str, chunks: Iterable[memoryview] | bytes, size: int | None = None) -> None:
        if isinstance(chunks, bytes):
            chunks, size = [memoryview(chunks)], len(chunks)
        filename = f"{self.archive}/{name}".encode()
        offset = self._tell()
        zip64 = size >= ZIP64_FROM
        # zip64 sizes go in an extra field; the 32-bit fields then say 0xFFFFFFFF.
        extra64 = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        header = _LOCAL_HEADER + len(filename) + len(extra64) + 4
        pad = -(offset + header) % _ALIGN
        # torch pads with an extra field the same way ("FB" + length + filler bytes).
        extra = extra64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        size32 = _MARKER if zip64 else size
        version = 45 if zip64 else 20
        self.f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, version, 0, 0, 0, _DOS_DATE, 0, size32, size32,
                                 len(filename), len(extra)) + filename + extra)
        crc, written = 0, 0
        for chunk in chunks:
            crc = crc32(chunk, crc)
            written += write_all(self.f, [chunk])
        if written != size:
            raise AssertionError(f"{name}: wrote {written} bytes, expected {size}")
        end = self.f.tell()
        self.f.seek(self.base + offset + 14)
        self.f.write(struct.pack("<I", crc))
        self.f.seek(end)
        # The central directory's zip64 field holds what does not fit in 32 bits, in the
        # spec's order: uncompressed size, compressed size, local header offset.
        big = [size, size] if zip64 else []
        big += [offset] if offset >= ZIP64_FROM else []
        cextra = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) if big else b""
        self.central.append(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, 0, 0, _DOS_DATE, crc, size32, size32,
            len(filename), len(cextra), 0, 0, 0, 0, _MARKER if offset >= ZIP64_FROM else offset) + filename + cextra)

    def _finish(self) -> None:
        start = self._tell()
        directory = b"".join(self.central)
        n, end = len(self.central), start + len(directory)
        zip64 = n >= 0xFFFF or start >= ZIP64_FROM or len(directory) >= ZIP64_FROM
        if zip64:
            directory += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(directory), start)
            directory += struct.pack("<IIQI", 0x07064B50, 0, end, 1)
        entries, size32, start32 = (0xFFFF, _MARKER, _MARKER) if zip64 else (n, end - start, start)
        directory += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, size32, start32, 0)
        self.f.write(directory)

    def write_archive(self, obj, storages: Iterable[Iterable[memoryview]], sizes: list[int]) -> None:
        """The whole archive: `obj`'s pickle, then storage i's chunks as data/i, then the trailer."""
        self.record("data.pkl", pickled(obj))
        self.record(".format_version", b"1")
        self.record(".storage_alignment", str(_ALIGN).encode())
        self.record("byteorder", b"little")
        for i, (chunks, size) in enumerate(zip(storages, sizes)):
            self.record(f"data/{i}", chunks, size)
        self.record("version", b"3\n")
        self.record(".data/serialization_id", "".join(str(secrets.randbelow(10)) for _ in range(40)).encode())
        self._finish()


class TorchWriter(OneFileWriter):
    target = "torch"
    def write(self, tmp: Path, stream: TensorStream) -> None:
        state = {t.name: tensor_ref(str(i), t) for i, t in enumerate(self.tensors)}
        with open(tmp, "wb") as f:
            TorchZip(f).write_archive(state, (chunks for _, chunks in stream.tensors(self.tensors)),
                                      [t.nbytes for t in self.tensors])
            fsync_file(f)
