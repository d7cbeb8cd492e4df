"""Which reader opens a path: the registry of formats and `open_checkpoint`.

The package (`graft.loading.formats`) fills the registry, in order, when it is imported.
Readers that open other readers (a transformers folder its weights file, an index its
shards, a torch file the folder it lies in, for its error) use `open_checkpoint` and
`detect` from here: this module imports no reader, so no reader imports the package that
imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

from graft.errors import CheckpointError
from graft.loading.formats.base import Checkpoint, OpenOptions
from graft.storage import as_path

READERS: list[type[Checkpoint]] = []
"""Every format, in the order `open_checkpoint` tries them (listed by the package)."""
FILE_READERS: list[type[Checkpoint]] = []
"""Readers of one file: given a folder, they name the files inside it they would read."""


def open_checkpoint(path: str | os.PathLike, options: OpenOptions | None = None,
                    format: str | None = None) -> Checkpoint:
    """Open `path` with the reader named by `format`, or the first whose `can_open` accepts it."""
    options = options or OpenOptions()
    path = as_path(path)
    if not path.exists():
        hint = "check the path"
        if path.parent.is_dir():
            near = sorted(p.name for p in path.parent.iterdir())[:10]
            hint += f"; {path.parent} holds {near}"
        raise CheckpointError(path, "no such file or directory", hint)
    if format is not None:
        for reader in READERS:
            if reader.format == format:
                if reader in FILE_READERS and path.is_dir():
                    raise folder_for_file_reader(path, reader)
                return reader(path, options)
        raise CheckpointError(path, f"unknown format {format!r}",
                              f"use one of {[r.format for r in READERS]} or leave format=None")
    if (reader := detect(path)) is not None:
        return reader(path, options)
    looked_for = "; ".join(f"{r.format}: {r.describes}" for r in READERS)
    raise CheckpointError(path, f"is no checkpoint format graft knows (looked for {looked_for})",
                          "pass format= explicitly, or convert the checkpoint to safetensors")


def detect(path: Path) -> type[Checkpoint] | None:
    """The reader `graft.open` would pick for `path` with no format=, or None."""
    return next((reader for reader in READERS if reader.can_open(path)), None)


def folder_for_file_reader(path: Path, reader: type[Checkpoint]) -> CheckpointError:
    """format= names a one-file reader but `path` is a folder: say which way does open it."""
    inside = sorted(p.name for p in path.iterdir() if p.is_file() and reader.can_open(p))
    found = detect(path)
    ways = []
    if found is not None:
        ways.append(f"leave format=None (the folder opens as {found.format!r})")
    if inside:
        ways.append(f"point at the file: {path / inside[0]}")
    return CheckpointError(path, f"is a folder; format={reader.format!r} reads one file",
                           " or ".join(ways) or f"point at a {reader.format} file")
