"""The atomic checkpoint folder: a temp folder, the manifest last, one rename; rotation after.

Rank 0 runs these (the other ranks only write their shard into the temp folder):

1. `begin()` makes `checkpoints/.tmp-<name>/shards/` (removing a leftover of the same name);
2. every rank writes, fsyncs and hashes its files there;
3. `commit(manifest)` writes manifest.json, fsyncs it and the folders, renames the folder to
   `<name>` and fsyncs `checkpoints/`; only then is the checkpoint visible, and complete;
4. `rotate()` deletes complete checkpoints beyond the newest `keep_last` (moved to `.trash-*`
   first, atomically), never the new one. It runs after the commit, so the previous checkpoint
   is never deleted before its successor is safe on disk.

A kill at any point leaves the previous state plus a `.tmp-*` or `.trash-*` folder (removed by
`clean_leftovers` on the next resume), or the new complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from graft._logging import get_logger
from graft.checkpointing.layout import CHECKPOINTS, MANIFEST, SHARDS, TMP_PREFIX, TRASH_PREFIX, candidates, sort_key
from graft.checkpointing.shard_writer import Written, write_bytes

log = get_logger(__name__)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpoint:
    """One checkpoint folder being written; visible only after `commit`."""

    def __init__(self, run_dir: str | Path, name: str):
        self.root = Path(run_dir) / CHECKPOINTS
        self.name = name
        self.tmp = self.root / f"{TMP_PREFIX}{name}"
        self.final = self.root / name

    def begin(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        (self.tmp / SHARDS).mkdir(parents=True)
        return self.tmp

    def commit(self, manifest: dict) -> Path:
        """Manifest last, rename, fsync the parent; returns the final path."""
        for sub in {self.tmp, *(p for p in self.tmp.rglob("*") if p.is_dir())}:
            fsync_dir(sub)
        manifest = {**manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_bytes(self.tmp / MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())
        fsync_dir(self.tmp)
        if self.final.exists():
            # A folder of the same name (a run resumed from an older checkpoint passes this
            # point again): swap it out atomically, then delete it.
            trash = self.root / f"{TRASH_PREFIX}{self.name}"
            if trash.exists():
                shutil.rmtree(trash)
            os.rename(self.final, trash)
            try:
                os.rename(self.tmp, self.final)
            except OSError:
                os.rename(trash, self.final)  # a failed swap puts the complete one back
                raise
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final)
            fsync_dir(self.root)
        return self.final

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def rotate(run_dir: str | Path, keep_last: int | None, newest: Path) -> list[str]:
    """Delete complete checkpoints older than the newest `keep_last`; never `newest`. Returns deleted names."""
    if keep_last is None:
        return []
    complete = [p for p in candidates(run_dir) if (p / MANIFEST).is_file()]  # newest first
    deleted = []
    for p in complete[keep_last:]:
        if p == newest or sort_key(p.name) >= sort_key(newest.name):
            continue
        trash = p.parent / f"{TRASH_PREFIX}{p.name}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(p.name)
    return deleted


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Remove `.tmp-*` and `.trash-*` folders of interrupted saves and rotations; returns their names."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


__all__ = ["AtomicCheckpoint", "Written", "clean_leftovers", "fsync_dir", "rotate"]
