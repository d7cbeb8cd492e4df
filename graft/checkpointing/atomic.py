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

On S3 (`S3Checkpoint`, chosen by `open_checkpoint` for an s3:// run folder) there is no rename,
so the manifest object is the commit and everything else is written under the final name:

1. `begin()` (rank 0) deletes what a folder of the same name holds, its manifest first;
2. every rank writes its shard to a local staging file (`GRAFT_STAGING_DIR`, else the system's
   temp folder), hashed while written, uploads it (multipart, parts in parallel: the ranks
   upload side by side) and removes it; rank 0 puts the small files from memory;
3. after every rank has reported success (the records' all_gather is the barrier), rank 0 puts
   state.json, then manifest.json: only from then on is the folder complete;
4. `rotate()` uncommits an old checkpoint (its manifest deleted first) before its other objects.

A kill at any point leaves the previous checkpoints plus a folder without a manifest, never
taken as complete (`layout.problem`) and deleted by `clean_leftovers` on the next resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from graft._logging import get_logger
from graft.checkpointing.layout import (CHECKPOINTS, HASH, MANIFEST, NAME, SHARDS, TMP_PREFIX, TRASH_PREFIX, RunPath,
                                        candidates, new_hasher, sort_key)
from graft.checkpointing.shard_writer import Written, write_bytes, write_shard
from graft.errors import GraftError, StorageError
from graft.storage import S3Path, as_path, delete, list_prefix, put_bytes, upload_file

log = get_logger(__name__)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpoint:
    """One checkpoint folder being written; visible only after `commit`."""

    remote = False

    def __init__(self, run_dir: str | Path, name: str):
        self.root = Path(run_dir) / CHECKPOINTS
        self.name = name
        self.tmp = self.root / f"{TMP_PREFIX}{name}"
        self.final = self.root / name

    def write_shard(self, rel: str, items: Sequence[tuple[str, torch.Tensor]], metadata: dict,
                    staging_bytes: int) -> tuple[Written, str | None]:
        """A rank's shard file into the temp folder: (what was written, None: no ETag on a disk)."""
        return write_shard(self.tmp / rel, items, metadata, staging_bytes=staging_bytes), None

    def write_file(self, rel: str, raw: bytes) -> tuple[Written, str | None]:
        return write_bytes(self.tmp / rel, raw), None

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


# -- S3 ---------------------------------------------------------------------------------------

STAGING_ENV = "GRAFT_STAGING_DIR"
"""Where a rank stages its shard before uploading it to S3 (default: the system's temp folder)."""
_STAGING_NAME = re.compile(r"^graft-staging-(\d+)-")


def staging_root() -> Path:
    return Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _clean_staging(root: Path) -> None:
    """Remove staging folders of processes of this host that are gone (a kill -9 mid-upload leaves
    its folder: nothing else would ever remove it). A reused pid only keeps a stale folder longer."""
    with contextlib.suppress(OSError):
        for p in root.iterdir():
            m = _STAGING_NAME.match(p.name)
            if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
                shutil.rmtree(p, ignore_errors=True)


def _delete_folder(folder: S3Path, objects: list[S3Path] | None = None) -> int:
    """Delete every object under `folder` (`objects`: as just listed), its manifest first and alone:
    a folder is never left complete-looking with objects missing, whatever order a bulk delete takes."""
    if objects is None:
        objects = [p for p, _ in list_prefix(folder)]
    manifest = folder / MANIFEST
    if manifest in objects:
        delete([manifest])
    delete([p for p in objects if p != manifest])
    return len(objects)


def _etag(path: S3Path) -> str | None:
    # upload_file/put_bytes forget what they know of the object they wrote: one HEAD of the new one.
    return path.stat().etag


class S3Checkpoint:
    """One checkpoint folder being written to S3, under its final name; complete once `commit`
    has put its manifest (see the module doc). `tmp` is `final`: where the ranks' files go."""

    remote = True

    def __init__(self, run_dir: str | S3Path, name: str):
        self.root = S3Path(run_dir) / CHECKPOINTS
        self.name = name
        self.final = self.root / name
        self.tmp = self.final
        self.committed = False

    def begin(self) -> S3Path:
        """Rank 0, before any rank writes: an older folder of this name goes (a leftover of an
        interrupted save, or a complete checkpoint a run resumed from an older one saves again).
        Its manifest is deleted first, so until the new one commits it is incomplete, not mixed."""
        objects = [p for p, _ in list_prefix(self.final)]
        if self.final / MANIFEST in objects:
            log.warning("%s exists and is complete: it is replaced (its manifest deleted now, the new one "
                        "written when every rank has uploaded its shard)", self.final)
        _delete_folder(self.final, objects)
        return self.final

    def _staging(self) -> Path:
        root = staging_root()
        _clean_staging(root)  # on every rank: each node has its own staging folder
        try:
            root.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f"graft-staging-{os.getpid()}-", dir=root))
        except OSError as e:
            raise _staging_error(root, e, self.name) from e

    def write_shard(self, rel: str, items: Sequence[tuple[str, torch.Tensor]], metadata: dict,
                    staging_bytes: int) -> tuple[Written, str | None]:
        """Write the shard to a local staging file (hashed while written; no fsync: it is read back
        at once and deleted, the store keeps it), upload it, remove it; (written, the object's ETag).

        Why stage instead of streaming the writer into a multipart upload: from a file,
        `upload_file` sends the parts in parallel and reads a failed part again to retry it, and
        the writer (hashing as it goes) never waits on the network; a stream would need its own
        part buffers and retry logic. The cost is local disk for one shard per rank for the
        length of the save (`GRAFT_STAGING_DIR` says where)."""
        stage = self._staging()
        try:
            local = stage / Path(rel).name
            try:
                written = write_shard(local, items, metadata, staging_bytes=staging_bytes, fsync=False)
            except OSError as e:
                raise _staging_error(stage.parent, e, self.name) from e
            target = self.final / rel
            upload_file(local, target)
            return Written(str(target), written.size, written.hash, written.algo, written.offsets), _etag(target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def write_file(self, rel: str, raw: bytes) -> tuple[Written, str | None]:
        """A small file (JSON, YAML) put from memory, hashed from memory."""
        target = self.final / rel
        put_bytes(target, raw)
        h = new_hasher(HASH)
        h.update(raw)
        return Written(str(target), len(raw), h.hexdigest(), HASH, {}), _etag(target)

    def commit(self, manifest: dict) -> S3Path:
        """Put the manifest: the commit (every other file is uploaded by now)."""
        manifest = {**manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        put_bytes(self.final / MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())
        self.committed = True
        return self.final

    def abandon(self) -> None:
        """Rank 0, after every rank has stopped writing: delete what this save uploaded (best effort:
        the error that stopped the save is the one to report, and the next resume deletes the rest).
        Never after the commit: the folder is then the newest complete checkpoint."""
        if self.committed:
            return
        try:
            _delete_folder(self.final)
        except GraftError as e:
            log.warning("could not delete the objects of the failed save under %s (%s); the next resume "
                        "deletes them", self.final, e)


def _staging_error(root: Path, e: OSError, name: str) -> StorageError:
    return StorageError(root, f"cannot stage the shard of checkpoint {name} for its upload: "
                              f"{e.strerror or e} ({e.filename or root})",
                        f"free space there, or set {STAGING_ENV} to a local folder with room for one shard per "
                        "rank of this node; then continue with --resume auto")


def open_checkpoint(run_dir: str | RunPath, name: str) -> AtomicCheckpoint | S3Checkpoint:
    """The writer of checkpoint `name` of `run_dir`: a temp folder and a rename on a disk, the
    manifest object as the commit on S3."""
    run_dir = as_path(run_dir)
    return S3Checkpoint(run_dir, name) if isinstance(run_dir, S3Path) else AtomicCheckpoint(run_dir, name)


def rotate(run_dir: str | RunPath, keep_last: int | None, newest: RunPath) -> list[str]:
    """Delete complete checkpoints older than the newest `keep_last`; never `newest`. Returns deleted names.
    Called after `newest` is committed, so the previous checkpoint is never deleted before it."""
    if keep_last is None:
        return []
    run_dir = as_path(run_dir)
    complete = [p for p in candidates(run_dir) if (p / MANIFEST).is_file()]  # newest first
    deleted = []
    for p in complete[keep_last:]:
        if p == newest or sort_key(p.name) >= sort_key(newest.name):
            continue
        if isinstance(p, S3Path):
            _delete_folder(p)
        else:
            trash = p.parent / f"{TRASH_PREFIX}{p.name}"
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
        deleted.append(p.name)
    return deleted


def clean_leftovers(run_dir: str | RunPath) -> list[str]:
    """Remove `.tmp-*` and `.trash-*` folders of interrupted saves and rotations; returns their names.

    On S3: every checkpoint folder without a manifest object (a save or rotation that was
    interrupted: there, nothing else is incomplete), listed afresh. Only the run's own trainer
    calls this, holding the run folder: no other writer can be mid-save in it."""
    run_dir = as_path(run_dir)
    if isinstance(run_dir, S3Path):
        root = (run_dir / CHECKPOINTS).refresh()
        if not root.is_dir():
            return []
        gone = []
        for p in root.iterdir():
            leftover = p.name.startswith((TMP_PREFIX, TRASH_PREFIX)) or (
                NAME.match(p.name) and p.is_dir() and not (p / MANIFEST).is_file())
            if leftover and _delete_folder(p):
                gone.append(p.name)
        return gone
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


__all__ = ["AtomicCheckpoint", "S3Checkpoint", "STAGING_ENV", "Written", "clean_leftovers", "fsync_dir",
           "open_checkpoint", "rotate", "staging_root"]
