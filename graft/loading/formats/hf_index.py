"""Hugging Face sharded checkpoints: `*.safetensors.index.json` / `pytorch_model.bin.index.json`.

Key names come from the index's weight_map alone; a shard is opened (its header, or its
pickle on the meta device) only when a key it holds is asked for, so planning a changed
model touches only the shards that hold a planned key.
"""

from __future__ import annotations

import json
from pathlib import Path

from graft.errors import CheckpointError
from graft.loading.formats.base import Checkpoint, OpenOptions, Span, TensorMeta

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


class HFIndex(Checkpoint):
    format = "hf-index"
    describes = "a sharded Hugging Face checkpoint (*.index.json, or a folder holding one)"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return find_index(path) is not None

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        self.index_path = find_index(self.path)
        try:
            index = json.loads(self.index_path.read_text())
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError) as e:
            raise CheckpointError(self.index_path, f"is not a valid index (needs a 'weight_map' object): {e}",
                                  "regenerate the index with save_pretrained / save_model") from e
        self.metadata = index.get("metadata", {})
        folder = self.index_path.parent
        self._shard_of = {k: str(folder / v) for k, v in weight_map.items()}
        missing = sorted({f for f in self._shard_of.values() if not Path(f).is_file()})
        if missing:
            raise CheckpointError(
                self.index_path,
                f"names shard(s) that do not exist: {[Path(m).name for m in missing]}",
                "copy the missing shard(s) next to the index, or fix the index's weight_map",
            )
        self._shards: dict[str, Checkpoint] = {}

    def shard(self, file: str) -> Checkpoint:
        """The reader of one shard, opened on first use."""
        if file not in self._shards:
            from graft.loading.formats import open_checkpoint

            shard = open_checkpoint(file, self.options)
            unknown = [k for k, f in self._shard_of.items() if f == file and k not in set(shard.keys())]
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

    def info(self) -> dict:
        files = sorted(set(self._shard_of.values()))
        return {**super().info(), "index": str(self.index_path), "shards": len(files),
                "shards_opened": len(self._shards)}

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
