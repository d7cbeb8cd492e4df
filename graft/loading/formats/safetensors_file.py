"""A single safetensors file, read from its header with no dependency on the safetensors package.

The header is held to exactly the rules of the format's reference reader (huggingface/
safetensors, `SafeTensors::read_metadata` and `Metadata::validate` in safetensors/src/
tensor.rs) and its written spec, so a file graft reads is a file the reference reads, with
the same values:

- the length field N is at most 100 000 000 and 8 + N fits in the file;
- the N header bytes are UTF-8 JSON, an object, starting with `{` and padded with trailing
  spaces only (the spec's rule), with no duplicate key (the spec disallows them; a parser
  keeping the last one would read other bytes than the writer meant);
- `__metadata__`, if present, maps strings to strings;
- every other key holds a known dtype, a shape of unsigned 64-bit integers and
  `data_offsets` [begin, end] of unsigned 64-bit integers;
- sorted by offsets, the tensors tile the data section from 0 with no gap and no overlap,
  each holds exactly numel x itemsize bytes (numel computed with 64-bit overflow checks,
  as the reference does), and 8 + N + the end of the last tensor is exactly the file size.

The last rule is what catches a length field one too small or too large: the header still
parses (padding absorbs it) but every tensor would be read one byte off.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from graft.errors import CheckpointError
from graft.loading.formats import json_file
from graft.loading.formats.base import Checkpoint, OpenOptions, TensorMeta
from graft.loading.formats.reading import Span
from graft.storage import open_file

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    # The reference's torch binding maps these too, where torch has them.
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                                                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"))
       if hasattr(torch, attr)},
}
# The reference reader's cap (MAX_HEADER_SIZE, decimal).
MAX_HEADER = 100_000_000
_U64 = 1 << 64
_TORCH_DIM = 1 << 63

_REWRITE = "the file is corrupt; write or copy it again"


def read_header(path: Path) -> tuple[int, dict, dict]:
    """(data start, {key: (dtype, shape, begin, end)}, __metadata__), all validated."""
    with open_file(path) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        if size < 8:
            raise CheckpointError(path, f"is {size} bytes, too short for a safetensors header",
                                  "the file is truncated or empty; write or copy it again")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise CheckpointError(path, f"header length {n} exceeds the format's limit of {MAX_HEADER} bytes",
                                  "the file is not safetensors or its first 8 bytes are corrupt")
        if 8 + n > size:
            raise CheckpointError(path, f"header length {n} does not fit in a {size}-byte file",
                                  "the file is truncated or not safetensors; write it again")
        raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(path, f"the header ended after {len(raw)} of its {n} bytes (the file shrank)",
                              "the file changed while being opened; wait for the writer and retry")
    if not raw.startswith(b"{"):
        raise CheckpointError(path, "the safetensors header does not start with '{'", _REWRITE)
    header = json_file.parse(raw, path, "the safetensors header", expect=dict, trailing_spaces=True)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(path, "the header's __metadata__ is not a map of strings to strings", _REWRITE)

    entries = {key: _entry(path, key, e) for key, e in header.items()}
    # Sorted by (begin, end), the tensors must tile the data section exactly (the reference's rule).
    expected = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else "leaves a gap before it"
            raise CheckpointError(
                path, f"header lies about {key!r}: its data_offsets [{begin}, {end}) start at {begin},"
                f" not at {expected} where the previous tensor ends (it {what}; tensors overlap or"
                f" skip bytes)", _REWRITE)
        expected = end
    start = 8 + n
    if start + expected != size:
        why = ("truncated: the tensors need" if start + expected > size else "the tensors account for")
        raise CheckpointError(
            path, f"{why} {expected} data bytes after the {n}-byte header, but the file has"
            f" {size - start} (its size must be exactly 8 + header + data)",
            "the file was cut short or its header length is wrong; write or copy it again")
    return start, entries, metadata


def _entry(path: Path, key: str, e: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One header entry, checked as the reference checks it."""
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise CheckpointError(path, f"header entry {key!r} is malformed (needs dtype, shape and"
                              f" data_offsets): {str(e)[:200]}", _REWRITE)
    name, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(name, str) or name not in DTYPES:
        raise CheckpointError(path, f"header entry {key!r} has dtype {str(name)[:40]!r}, which graft cannot hold",
                              f"supported: {sorted(DTYPES)}; convert the tensor or write the file again")
    if not isinstance(shape, list) or not all(json_file.is_uint(d) for d in shape):
        raise CheckpointError(path, f"header entry {key!r} has shape {str(shape)[:200]}, not a list of"
                              " non-negative 64-bit integers", _REWRITE)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(json_file.is_uint(x) for x in offsets)):
        raise CheckpointError(path, f"header entry {key!r} has data_offsets {str(offsets)[:200]}, not"
                              " [begin, end] as non-negative 64-bit integers", _REWRITE)
    if any(d >= _TORCH_DIM for d in shape):  # only a zero-size tensor gets this far; torch sizes are int64
        raise CheckpointError(path, f"header entry {key!r} has shape {shape}, beyond torch's int64 sizes",
                              _REWRITE)
    dtype = DTYPES[name]
    begin, end = offsets
    numel = 1
    for d in shape:  # the reference multiplies in u64 and refuses an overflow at any step
        numel *= d
        if numel >= _U64:
            raise CheckpointError(path, f"header entry {key!r}: shape {shape} overflows 64 bits", _REWRITE)
    nbytes = numel * dtype.itemsize
    if nbytes >= _U64:
        raise CheckpointError(path, f"header entry {key!r}: shape {shape} of {name} overflows 64 bits", _REWRITE)
    if end < begin or end - begin != nbytes:
        raise CheckpointError(
            path,
            f"header lies about {key!r}: offsets [{begin}, {end}) hold {end - begin} bytes"
            f" but shape {shape} of {name} needs {nbytes}",
            _REWRITE,
        )
    return dtype, tuple(shape), begin, end


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
