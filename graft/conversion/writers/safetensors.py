"""The safetensors writer: an 8-byte header length, a JSON header, then the raw tensor bytes.

Every offset is known from metadata, so the header is written first and the tensors are
streamed after it in header order, contiguous, as the reference reader requires.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Sequence

from graft.conversion.select import OutTensor
from graft.conversion.staging import fsync_file, write_all
from graft.conversion.stream import TensorStream
from graft.conversion.writers import OneFileWriter
from graft.loading.formats.safetensors_file import DTYPES

_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def header(tensors: Sequence[OutTensor]) -> bytes:
    """The length prefix and JSON header for `tensors`, stored in this order."""
    # transformers refuses shards without format=pt in their metadata.
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the reference pads to 8 bytes so the data is aligned
    return struct.pack("<Q", len(text)) + text


def write_file(path: Path, tensors: Sequence[OutTensor], stream: TensorStream) -> None:
    with open(path, "wb", buffering=0) as f:
        write_all(f, [memoryview(header(tensors))])
        for _, chunks in stream.tensors(tensors):
            write_all(f, chunks)
        fsync_file(f)


class SafetensorsWriter(OneFileWriter):
    target = "safetensors"
    def write(self, tmp: Path, stream: TensorStream) -> None:
        write_file(tmp, self.tensors, stream)
