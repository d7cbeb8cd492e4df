"""A single safetensors file, read from its header with no dependency on the safetensors package.

The header is checked against the file before anything is trusted: offsets in range, no
overlaps, sizes that agree with shape x dtype, and a file long enough to hold them all.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from graft.errors import CheckpointError
from graft.loading.formats.base import Checkpoint, OpenOptions, Span, TensorMeta

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
# A header larger than this is not a safetensors header (the reference reader caps at 100 MB).
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[int, dict, dict]:
    """(data start, {key: (dtype, shape, begin, end)}, __metadata__), all validated."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, f"is {size} bytes, too short for a safetensors header",
                              "the file is truncated or empty; write or copy it again")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(path, f"header length {n} does not fit in a {size}-byte file",
                                  "the file is truncated or not safetensors; write it again")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"the safetensors header is not valid JSON ({e})",
                              "the file is corrupt; write or copy it again") from e
    if not isinstance(header, dict):
        raise CheckpointError(path, "the safetensors header is not a JSON object",
                              "the file is corrupt; write or copy it again")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    entries = {}
    ranges = []
    for key, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(path, f"header entry {key!r} is malformed: {e!r}",
                                  "the file is corrupt; write it again") from err
        numel = math.prod(shape)
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise CheckpointError(
                path,
                f"header lies about {key!r}: offsets [{begin}, {end}) hold {end - begin} bytes"
                f" but shape {list(shape)} of {e['dtype']} needs {numel * dtype.itemsize}",
                "the file is corrupt; write it again",
            )
        if end > data_len:
            raise CheckpointError(
                path,
                f"truncated: {key!r} ends at data byte {end} but the file holds {data_len}",
                "the file was cut short; copy it again",
            )
        entries[key] = (dtype, shape, begin, end)
        ranges.append((begin, end, key))
    ranges.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise CheckpointError(path, f"header lies: {k0!r} and {k1!r} overlap",
                                  "the file is corrupt; write it again")
    return start, entries, metadata


class SafetensorsFile(Checkpoint):
    format = "safetensors"
    describes = "a .safetensors file"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == ".safetensors"

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        self._start, self._entries, self.metadata = read_header(self.path)

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, key: str) -> TensorMeta:
        dtype, shape, _, _ = self._entries[key]
        return TensorMeta(key, shape, dtype, str(self.path))

    def span(self, key: str) -> Span:
        _, _, begin, end = self._entries[key]
        return Span(str(self.path), self._start + begin, end - begin)

    def info(self) -> dict:
        return {**super().info(), "metadata": self.metadata}
