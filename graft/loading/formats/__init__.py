"""One reader per checkpoint format, and `open_checkpoint`, which picks the right one.

A new format is one module here with a `Checkpoint` subclass, added to `READERS`. The
order matters: folder formats that contain files another reader would also accept come
first (an accelerate folder holds a model.safetensors).
"""

from __future__ import annotations

import os
from pathlib import Path

from graft.errors import CheckpointError
from graft.loading.formats.accelerate_folder import AccelerateFolder
from graft.loading.formats.base import Checkpoint, OpenOptions, Span, TensorMeta
from graft.loading.formats.dcp import DCPFolder
from graft.loading.formats.deepspeed_folder import DeepSpeedFolder
from graft.loading.formats.graft_run import GraftRun
from graft.loading.formats.hf_index import HFIndex
from graft.loading.formats.safetensors_file import SafetensorsFile
from graft.loading.formats.torch_file import TorchFile

READERS: list[type[Checkpoint]] = [GraftRun, DeepSpeedFolder, DCPFolder, AccelerateFolder, HFIndex, SafetensorsFile, TorchFile]

__all__ = ["Checkpoint", "OpenOptions", "Span", "TensorMeta", "READERS", "open_checkpoint"]


def open_checkpoint(path: str | os.PathLike, options: OpenOptions | None = None,
                    format: str | None = None) -> Checkpoint:
    """Open `path` with the reader named by `format`, or the first whose `can_open` accepts it."""
    options = options or OpenOptions()
    path = Path(path)
    if not path.exists():
        hint = "check the path"
        if path.parent.is_dir():
            near = sorted(p.name for p in path.parent.iterdir())[:10]
            hint += f"; {path.parent} holds {near}"
        raise CheckpointError(path, "no such file or directory", hint)
    if format is not None:
        for reader in READERS:
            if reader.format == format:
                return reader(path, options)
        raise CheckpointError(path, f"unknown format {format!r}",
                              f"use one of {[r.format for r in READERS]} or leave format=None")
    for reader in READERS:
        if reader.can_open(path):
            return reader(path, options)
    looked_for = "; ".join(f"{r.format}: {r.describes}" for r in READERS)
    raise CheckpointError(path, f"is no checkpoint format graft knows (looked for {looked_for})",
                          "pass format= explicitly, or convert the checkpoint to safetensors")
