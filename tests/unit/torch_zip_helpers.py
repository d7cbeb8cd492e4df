"""Small torch archives and surgery on their zip structure, shared by the torch-zip tests."""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile

import torch
from torch import nn


def sample_state() -> dict[str, torch.Tensor]:
    """Several dtypes, views with a storage_offset, a shared storage, a non-contiguous view."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, generator=g)
    return {
        "a.w": base.view(4, 6),  # storage shared by the next two
        "a.v": base[6:12],  # contiguous view, storage_offset 6
        "t": base.view(4, 6).t(),  # non-contiguous view of the same storage
        "h": torch.randn(5, generator=g).half(),
        "bf": torch.randn(2, 3, generator=g).bfloat16(),
        "i": torch.arange(7, dtype=torch.int64) * 1000003,
        "mask": torch.tensor([True, False, True]),
        "s": torch.tensor(2.5, dtype=torch.float64),  # 0-dim
    }


class Model(nn.Module):
    """A model whose keys and shapes are those of `sample_state`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.a.w = nn.Parameter(torch.zeros(4, 6))
        self.a.v = nn.Parameter(torch.zeros(6))
        self.t = nn.Parameter(torch.zeros(6, 4))
        self.h = nn.Parameter(torch.zeros(5, dtype=torch.float16))
        self.bf = nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))
        self.register_buffer("i", torch.zeros(7, dtype=torch.int64))
        self.register_buffer("mask", torch.zeros(3, dtype=torch.bool))
        self.register_buffer("s", torch.zeros((), dtype=torch.float64))


def saved(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info, z.read(info)) for info in z.infolist()]


def repack(data: bytes, *, reverse: bool = False, extra: bytes = b"", comment: bytes = b"",
           replace: dict[str, bytes] | None = None, compress: str | None = None) -> bytes:
    """The same records written by Python's zipfile (another layout than torch's writer):
    optionally in reverse order, with an extra field on every record, an archive comment,
    some records' bytes replaced, or one record compressed."""
    items = members(data)
    if reverse:
        items = items[:1] + items[1:][::-1]  # torch takes the folder name from the first record
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info, body in items:
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.extra = extra
            new.compress_type = zipfile.ZIP_DEFLATED if compress and info.filename.endswith(compress) \
                else zipfile.ZIP_STORED
            for suffix, replacement in (replace or {}).items():
                if info.filename.endswith(suffix):
                    body = replacement
            z.writestr(new, body)
        z.comment = comment
    return out.getvalue()


def record_spans(data: bytes) -> dict[str, tuple[int, int, int]]:
    """name -> (local header offset, data offset, data size), from the local headers."""
    spans = {}
    for info, _ in members(data):
        n, m = struct.unpack_from("<HH", data, info.header_offset + 26)
        spans[info.filename] = (info.header_offset, info.header_offset + 30 + n + m, info.file_size)
    return spans


def central_directory(data: bytes) -> tuple[int, int]:
    """(offset, size) of the central directory, from the end record."""
    eocd = data.rfind(b"PK\x05\x06")
    size, offset = struct.unpack_from("<LL", data, eocd + 12)
    return offset, size


def patch_pickle_int(pkl: bytes, old: int, new: int) -> bytes:
    """The pickle with the one BININT1 `old` replaced by `new` (both < 256)."""
    hits = [pos for op, arg, pos in pickletools.genops(pkl) if op.name == "BININT1" and arg == old]
    assert len(hits) == 1, hits
    out = bytearray(pkl)
    out[hits[0] + 1] = new
    return bytes(out)
