"""Where low-level failures become `CheckpointError`s.

`checkpoint_errors(path)` wraps every entry into untrusted bytes (opening a checkpoint,
opening a shard lazily, reading tensors) and turns an OSError (permission denied, I/O
error, a file that vanished) or an exception a parser raises on malformed bytes into an
error naming the file, the problem and the way out, chained to the original.

Its own module so that both the reader interface (`base`) and the I/O engine (`reading`)
use it without importing each other.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from contextlib import contextmanager
from typing import Iterator

from graft.errors import CheckpointError, GraftError

# What the file system and parsers of untrusted bytes raise. Deliberately not TypeError,
# KeyError, AttributeError or AssertionError: readers check the types they rely on
# themselves, so those mean a bug in graft, and a bug keeps its traceback.
_LOW_LEVEL = (OSError, ValueError, OverflowError, RecursionError, EOFError, struct.error,
              zipfile.BadZipFile, pickle.UnpicklingError)


def as_checkpoint_error(path: str | os.PathLike, e: BaseException) -> CheckpointError:
    """The CheckpointError that says what `e`, raised while reading `path`, means for the user."""
    if isinstance(e, OSError):
        where = e.filename if isinstance(e.filename, (str, bytes, os.PathLike)) else path
        reason = e.strerror or str(e)
        if isinstance(e, PermissionError):
            return CheckpointError(where, f"cannot be read: permission denied ({reason})",
                                   "give this user read access to the file and search (x) access to"
                                   " every folder above it (ls -l, chmod, or run as its owner)")
        if isinstance(e, FileNotFoundError):
            return CheckpointError(where, f"disappeared while graft was reading it ({reason})",
                                   "another process moved or deleted it; wait for it, or copy the"
                                   " checkpoint somewhere stable")
        return CheckpointError(where, f"cannot be read: {reason}",
                               "check the file system (dmesg, mount, free space) and read access;"
                               " copy the checkpoint elsewhere if the storage is failing")
    return CheckpointError(path, f"cannot be read ({type(e).__name__}: {str(e)[:300]})",
                           "the file is damaged or not what its name says; write or copy it again")


@contextmanager
def checkpoint_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a low-level failure inside the block into a CheckpointError about `path` (GraftErrors pass)."""
    try:
        yield
    except GraftError:
        raise
    except _LOW_LEVEL as e:
        raise as_checkpoint_error(path, e) from e
