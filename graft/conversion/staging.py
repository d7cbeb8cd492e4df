"""Write a conversion's output under a temporary name and make it appear only when complete.

The output (a file or a folder) is written beside DST as `DST.graft-tmp-<pid>`, every file
fsynced, then renamed to DST and the parent folder fsynced: a reader sees either nothing
or the whole output. Any failure (a full disk, a bad source byte, Ctrl-C) removes the
temporary, so nothing that looks complete is left behind. An existing DST is refused
unless `force`; with `force`, the old one is replaced only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from graft.errors import CheckpointError, GraftError


def refuse_existing(dst: Path, force: bool) -> None:
    if (dst.exists() or dst.is_symlink()) and not force:
        raise CheckpointError(dst, "already exists; graft convert does not overwrite",
                              "pass --force (force=True) to replace it, or choose another DST")


def write_all(f: BinaryIO, chunks: Iterable[memoryview]) -> int:
    """Write every chunk whole (raw files may take part of a write); returns the bytes written."""
    total = 0
    for chunk in chunks:
        done = 0
        while done < len(chunk):
            n = f.write(chunk[done:])
            done += len(chunk) - done if n is None else n
        total += done
    return total


def fsync_file(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(dst: Path, *, folder: bool, force: bool) -> Iterator[Path]:
    """Yield the temporary path to write (a fresh empty folder if `folder`); publish it as `dst`."""
    refuse_existing(dst, force)
    tmp = dst.with_name(f"{dst.name}.graft-tmp-{os.getpid()}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        if folder:
            tmp.mkdir()
        yield tmp
        if folder:
            fsync_dir(tmp)
        # Checked again: another process may have created DST while we wrote.
        refuse_existing(dst, force)
        old = None
        if dst.exists() and folder:
            # A folder cannot replace a non-empty folder in one rename: move the old one aside first.
            old = dst.with_name(f"{dst.name}.graft-old-{os.getpid()}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
        if old is not None:
            _remove(old)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, GraftError):
            raise CheckpointError(
                dst, f"cannot be written: {e.strerror or e} ({e.filename or tmp})",
                "free space or write elsewhere (df -h), and check write access; nothing was left at DST",
            ) from e
        raise
