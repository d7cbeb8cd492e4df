"""Folders written by Hugging Face transformers: `save_pretrained`, and the HF Trainer's
`checkpoint-N/` folders and the output folder that holds them.

save_pretrained writes config.json beside the weights (model.safetensors, or shards and
model.safetensors.index.json; pytorch_model.bin[.index.json] from older versions). A Trainer
checkpoint adds optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin and
trainer_state.json, which it writes last (transformers' `Trainer._save_checkpoint`), so a
checkpoint folder without it is incomplete. An output folder holds `checkpoint-N` folders, N
the global step: it opens as its newest complete one, by step, and says which (as graft's
own run folders do). Only the weights are opened, by the reader of their file.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from graft.errors import CheckpointError
from graft.loading.formats.base import OpenOptions
from graft.loading.formats.delegate import Delegating
from graft.loading.formats.registry import open_checkpoint
from graft.storage import as_path

# transformers' names, safest first (safetensors before pickles, an index before a lone shard).
WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
           "pytorch_model.bin")
CONFIG, TRAINER_STATE = "config.json", "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + step


def weights_in(folder: Path) -> str | None:
    """The name of the weights save_pretrained wrote in `folder`, or None."""
    return next((n for n in WEIGHTS if (folder / n).is_file()), None)


def is_trainer_checkpoint(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file()


def trainer_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The `checkpoint-N` folders inside a Trainer output folder, newest (highest step) first."""
    try:
        found = [(int(m.group(1)), folder / n) for n in [p.name for p in as_path(folder).iterdir()] if (m := _CHECKPOINT.match(n))]
    except OSError:
        return []
    return sorted((c for c in found if c[1].is_dir()), reverse=True)


class TransformersFolder(Delegating):
    format = "transformers"
    describes = "a save_pretrained folder (config.json beside model.safetensors, shards or pytorch_model.bin)"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return (path.is_dir() and (path / CONFIG).is_file() and weights_in(path) is not None
                and not is_trainer_checkpoint(path))

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        self.folder = self._resolve()
        self.weights = weights_in(self.folder)
        if self.weights is None:
            raise CheckpointError(self.folder, f"holds no weights under transformers' names ({', '.join(WEIGHTS)})",
                                  "point at the folder save_pretrained or the Trainer wrote")
        self.inner = open_checkpoint(self.folder / self.weights, options)
        where = self.folder.relative_to(self.path) / self.weights if self.folder != self.path else self.weights
        self.source = str(where) + (f" ({self.inner.source})" if self.inner.source else "")

    def _resolve(self) -> Path:
        if not self.path.is_dir():
            raise CheckpointError(self.path, f"is not a folder; {self.format} checkpoints are folders",
                                  "point at the folder, or leave format=None")
        return self.path

    def info(self) -> dict:
        return {**super().info(), "weights": self.weights, "weights_format": self.inner.format,
                "config": (self.folder / CONFIG).is_file(), **self.inner_info()}


class HFTrainerFolder(TransformersFolder):
    format = "hf-trainer"
    describes = "an HF Trainer checkpoint-N folder (trainer_state.json) or the output folder holding them"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if not path.is_dir():
            return False
        if is_trainer_checkpoint(path):
            return weights_in(path) is not None
        return weights_in(path) is None and bool(trainer_checkpoints(path))

    def _resolve(self) -> Path:
        super()._resolve()
        self.skipped: list[str] = []
        if is_trainer_checkpoint(self.path) or weights_in(self.path) is not None:
            return self.path
        found = trainer_checkpoints(self.path)
        if not found:
            raise CheckpointError(self.path, "holds neither trainer_state.json nor checkpoint-N folders",
                                  "point at a Trainer's output_dir or one of its checkpoint-N folders")
        for step, folder in found:
            if is_trainer_checkpoint(folder) and weights_in(folder) is not None:
                if self.skipped:
                    warnings.warn(f"{self.path}: skipped incomplete {', '.join(self.skipped)} (no"
                                  f" {TRAINER_STATE} or weights: the save was interrupted); using {folder.name}",
                                  stacklevel=2)
                return folder
            self.skipped.append(folder.name)
        raise CheckpointError(self.path, f"none of its checkpoint folders is complete ({', '.join(self.skipped)}:"
                              f" each lacks {TRAINER_STATE} or weights)",
                              "the saves were interrupted; train again or point at a folder with weights")

    def info(self) -> dict:
        m = _CHECKPOINT.match(self.folder.name)
        return {**super().info(), "checkpoint": str(self.folder), "step": int(m.group(1)) if m else None,
                "skipped_incomplete": self.skipped or None}
