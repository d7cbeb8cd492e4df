"""Hugging Face sharded checkpoints: `*.safetensors.index.json` / `pytorch_model.bin.index.json`.

Key names come from the index's weight_map alone; a shard is opened (its header, or its
pickle on the meta device) only when a key it holds is asked for, so planning a changed
model touches only the shards that hold a planned key.

The index is untrusted: it is parsed by the bounded JSON parser, and every shard it names
must lie inside the index's folder. That test is lexical (the entry is a relative path
with no `..` component), not on the resolved target: the Hugging Face
cache keeps `snapshots/<rev>/model-00001-of-00002.safetensors` as a symlink to
`../../blobs/<sha>`, which must keep working, while `../x`, `/etc/x` and `a/../../x` in a
downloaded index must not make graft read files the checkpoint does not own.
"""

from __future__ import annotations

import os
from pathlib import Path

from graft.errors import CheckpointError
from graft.loading.formats import json_file
from graft.loading.formats.base import Checkpoint, OpenOptions, TensorMeta
from graft.loading.formats.failures import checkpoint_errors
from graft.loading.formats.reading import Span
from graft.loading.formats.registry import open_checkpoint
from graft.loading.formats.torch_file import TorchFile
from graft.storage import as_path

# What a shard may be: one file of tensors (never another index or a folder format).
SHARD_FORMATS = ("safetensors", "torch")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def find_index(path: Path) -> Path | None:
    if path.is_file() and path.name.endswith(".index.json"):
        return path
    if path.is_dir():
        for name in INDEX_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.index.json"))
        if len(found) == 1:
            return found[0]
    return None


def shard_path(index_path: Path, folder: Path, key: str, entry: object) -> str:
    """folder/entry, refused unless `entry` is a relative path that stays inside `folder`.

    Lexical on purpose (see the module docstring): symlinks inside the folder may point
    anywhere, as the Hugging Face cache's do; the index itself may not. A `..` component is
    refused even where it would stay inside (`sub/../x`): the kernel resolves `sub/..`
    through `sub` if that is a symlink, so only a path without `..` means what it says.
    """
    way_out = "the index is corrupt or hostile; use the index its writer published, or regenerate it"
    if not isinstance(entry, str):
        raise CheckpointError(index_path, f"weight_map[{key!r}] is a JSON {json_file.type_name(entry)},"
                              " not a shard file name", way_out)
    parts = [p for p in entry.split("/") if p not in ("", ".")]
    if not parts or "\0" in entry or os.path.isabs(entry) or ".." in parts:
        raise CheckpointError(index_path, f"weight_map[{key!r}] = {entry[:200]!r} is not a file inside"
                              f" the index's folder {folder}", way_out)
    return str(folder.joinpath(*parts))


class HFIndex(Checkpoint):
    format = "hf-index"
    describes = "a sharded Hugging Face checkpoint (*.index.json, or a folder holding one)"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return find_index(path) is not None

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        self.index_path = find_index(self.path)
        index = json_file.read(self.index_path, "the index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(self.index_path, f"is not a valid index: 'weight_map' is"
                                  f" {json_file.type_name(weight_map) if 'weight_map' in index else 'missing'},"
                                  " not an object", "regenerate the index with save_pretrained / save_model")
        self.metadata = index.get("metadata") or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(self.index_path, f"is not a valid index: 'metadata' is a JSON"
                                  f" {json_file.type_name(self.metadata)}, not an object",
                                  "regenerate the index with save_pretrained / save_model")
        folder = self.index_path.parent
        self._shard_of = {k: shard_path(self.index_path, folder, k, v) for k, v in weight_map.items()}
        missing = sorted({f for f in self._shard_of.values() if not as_path(f).is_file()})
        if missing:
            raise CheckpointError(
                self.index_path,
                f"names shard(s) that do not exist: {[as_path(m).name for m in missing]}",
                "copy the missing shard(s) next to the index, or fix the index's weight_map",
            )
        self._shards: dict[str, Checkpoint] = {}

    def shard(self, file: str) -> Checkpoint:
        """The reader of one shard, opened on first use."""
        if file not in self._shards:
            with checkpoint_errors(file):
                shard = open_checkpoint(file, self.options)
            if shard.format not in SHARD_FORMATS:  # e.g. an index naming itself: endless recursion
                shard.close()
                raise CheckpointError(self.index_path, f"names {file} as a shard, but it is a"
                                      f" {shard.format} checkpoint, not one file of tensors",
                                      "the index is corrupt; regenerate it")
            held = set(shard.keys())
            unknown = [k for k, f in self._shard_of.items() if f == file and k not in held]
            if unknown:
                raise CheckpointError(file, f"the index places {unknown[:5]} here, but the shard lacks them",
                                      "the index and the shards disagree; regenerate the index")
            self._shards[file] = shard
        return self._shards[file]

    @property
    def shards_opened(self) -> list[str]:
        return list(self._shards)

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def meta(self, key: str) -> TensorMeta:
        return self.shard(self._shard_of[key]).meta(key)

    def span(self, key: str) -> Span | None:
        return self.shard(self._shard_of[key]).span(key)

    def _materialize(self, key: str):
        return self.shard(self._shard_of[key])._materialize(key)

    def options_used(self) -> frozenset[str]:
        # The shards are opened with the same options: torch shards use the torch file's.
        if all(file.endswith(".safetensors") for file in self._shard_of.values()):
            return self.uses
        return self.uses | TorchFile.uses

    def info(self) -> dict:
        files = sorted(set(self._shard_of.values()))
        return {**super().info(), "index": str(self.index_path), "shards": len(files),
                "shards_opened": len(self._shards)}

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
