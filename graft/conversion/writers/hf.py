"""The Hugging Face layout: safetensors shards of at most `max_shard_size` and their index.

Sharding follows huggingface_hub: tensors in order, a new shard when the next tensor would
pass the limit, a tensor larger than the limit alone in its shard; names
`model-00001-of-00003.safetensors`. The index (`metadata.total_size`, `weight_map`) is
written last, so a folder with an index has all its shards; it is written even for one
shard, so every output has the same shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from graft.conversion.staging import fsync_file
from graft.conversion.stream import TensorStream
from graft.conversion.writers import OutFile, Writer
from graft.conversion.writers.safetensors import write_file
from graft.errors import PlanError

INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9 (decimal, as HF), '500MiB' -> 500 * 2**20, 1000 -> 1000."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise PlanError(f"max_shard_size={size!r}: expected a size such as 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class HFWriter(Writer):
    target = "hf"
    folder = True

    def layout(self) -> list[OutFile]:
        limit = self.options.max_shard_size
        shards: list[list] = [[]]
        size = 0
        for t in self.tensors:
            if shards[-1] and size + t.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        return [OutFile(f"model-{i:05d}-of-{n:05d}.safetensors", tuple(s)) for i, s in enumerate(shards, 1)]

    def write(self, tmp: Path, stream: TensorStream) -> None:
        files = self.layout()
        for shard in files:
            write_file(tmp / shard.name, shard.tensors, stream)
        index = {"metadata": {"total_size": sum(f.nbytes for f in files)},
                 "weight_map": {t.name: f.name for f in files for t in f.tensors}}
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        with open(tmp / INDEX, "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            fsync_file(f)
