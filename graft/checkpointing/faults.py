"""The run folder's OS errors as one line each: `graft.RunDirError` at start, `graft.StorageError` in a save.

    check_writable(run_dir)                  # at start (rank 0), before any training step
    raise save_failed(run_dir, tmp, describe_failure(e), remove=True, own=e)   # a save failed
    with explained(run_dir, file): ...       # another write into the run folder (metrics.jsonl...)

Only what the user or the machine can fix becomes one of these (disk full, quota, read-only
filesystem, no permission, a file where a folder should be); every other OSError keeps its
traceback, since it is a bug or a failure we know nothing about.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from graft.errors import GraftError, RunDirError, StorageError
from graft.checkpointing.layout import MANIFEST, TMP_PREFIX, candidates
from graft.storage import S3Path, as_path, put_bytes

PROBE_PREFIX = ".probe-"

_FULL = {errno.ENOSPC, errno.EDQUOT}
_KNOWN = _FULL | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}

SPACE_WAY_OUT = ("free space there, or set another train.out_dir, or lower train.keep_last (old checkpoints are "
                 "deleted only after a new one is saved, so keep_last=N needs room for N+1)")


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (its nearest existing parent)."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def _regular_file_in(path: Path) -> Path | None:
    """The first component of `path` that exists and is not a folder (out_dir under a file)."""
    for p in (*reversed(path.parents), path):
        if p.exists() and not p.is_dir():
            return p
    return None


def _user() -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return path


def explain(e: OSError, run_dir: Path, during: str, cls: type[RunDirError] = RunDirError,
            need: int | None = None) -> RunDirError | None:
    """`e` as a one-line error of the run folder, or None when it is nothing the user can fix.
    `need`: bytes the failed write needed, when known (said in the disk-full message)."""
    run_dir = Path(run_dir)
    code = e.errno
    if code not in _KNOWN:
        return None
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _regular_file_in(run_dir)
        if blocker is None:
            return None
        return cls(run_dir, f"cannot be the run folder ({during}): {blocker} is a regular file, not a folder",
                   "remove or rename that file, or set train.out_dir to a path whose parents are folders")
    if code in _FULL:
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        needs = f", a checkpoint needs about {human(need)}" if need else ""
        return cls(run_dir, f"{what} {during} ({human(free_bytes(run_dir))} free{needs})", SPACE_WAY_OUT)
    if code == errno.EROFS:
        return cls(run_dir, f"is on a read-only filesystem ({during})",
                   "remount it read-write, or set train.out_dir to a folder on a writable filesystem")
    where = _nearest_existing(Path(e.filename) if e.filename else run_dir)
    try:
        st = where.stat()
        detail = f"; {where} is owned by uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}"
    except OSError:
        detail = ""
    return cls(run_dir, f"no write permission for {_user()} ({during}){detail}",
               "make the folder writable for this user (chown / chmod), or set train.out_dir to a folder you own")


def check_writable(run_dir: str | os.PathLike | S3Path) -> None:
    """Create RUN_DIR (and its parents) and prove a file can be created, fsynced and removed in it,
    so a folder that cannot hold checkpoints fails now, before any training step. On S3: put and
    delete a probe object (the bucket exists, the credentials may write and delete there)."""
    run_dir = as_path(run_dir)
    if isinstance(run_dir, S3Path):
        _check_writable_s3(run_dir)
        return
    probe = run_dir / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, b"graft write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)  # written in part on a full disk
        err = explain(e, run_dir, "at start")
        if err is None:
            raise
        raise err from e


def _check_writable_s3(run_dir: S3Path) -> None:
    probe = run_dir / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        put_bytes(probe, b"graft write probe\n")
        probe.unlink(missing_ok=True)
    except GraftError as e:
        # graft.storage says what S3 refused and why; said here as the run folder's problem.
        problem = getattr(e, "problem", str(e))
        way_out = getattr(e, "way_out", None) or "check the bucket, the credentials and AWS_ENDPOINT_URL"
        raise RunDirError(run_dir, f"cannot hold checkpoints (at start: {problem})", way_out) from e


def upload_failed(run_dir: str | os.PathLike | S3Path, name: str, failure: dict) -> StorageError:
    """The StorageError every rank raises when a rank's upload (or a put of rank 0's) failed:
    which rank, what S3 said, that no manifest was written and what is intact. `failure` is
    save._failure() of a graft.storage error."""
    run_dir = as_path(run_dir)
    g = failure["graft"]
    try:
        newest = next((p.name for p in candidates(run_dir) if (p / MANIFEST).is_file()), None)
    except GraftError:
        newest = None  # the storage that refused the upload may refuse the listing too
    kept = (f"the newest complete checkpoint {newest} is intact" if newest else "no checkpoint was completed yet")
    rank = f" on rank {failure['rank']}" if failure.get("rank") else ""
    return StorageError(run_dir, f"saving checkpoint {name} failed{rank}: {g['path']}: {g['problem']}; no manifest "
                                 f"was written, so {name} is not a checkpoint; {kept}",
                        f"{g['way_out'] or 'check the storage'} (a stopped run continues with --resume auto)")


def describe_failure(e: OSError, rank: int = 0) -> dict:
    """A save failure as plain data (crosses ranks in an all_gather, unlike some OSErrors)."""
    return {"errno": e.errno, "strerror": e.strerror or str(e), "filename": e.filename, "rank": rank}


def _checkpoint_size(run_dir: Path) -> int | None:
    """Bytes of the newest complete checkpoint (its manifest's sizes): what the next one will need."""
    for folder in candidates(run_dir):
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
            return sum(int(f["size"]) for f in files.values())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def save_failed(run_dir: str | os.PathLike, tmp: Path, failure: dict, *, remove: bool,
                own: OSError | None = None) -> Exception:
    """The exception a failed save raises (`failure`: describe_failure() of the rank that failed;
    `own`: this rank's OSError, if it had one). `tmp` is removed first (best effort, when `remove`).
    A failure the user can fix gives a StorageError: the folder, what happened, the newest complete
    checkpoint (intact), the space needed and free when known, and the way out. Any other failure
    stays what it was: `own` with its traceback, or an OSError naming the rank that failed."""
    run_dir = Path(run_dir)
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)  # best effort: a full disk gets its space back
    e = own or OSError(failure["errno"], f"rank {failure['rank']} could not write the checkpoint: "
                                         f"{failure['strerror']}", failure["filename"])
    file = Path(failure["filename"]).name if failure["filename"] else None
    during = f"while saving checkpoint {tmp.name.removeprefix(TMP_PREFIX)}" + (f" (writing {file})" if file else "")
    if failure.get("rank"):
        during += f" on rank {failure['rank']}"
    need = _checkpoint_size(run_dir) if failure["errno"] in _FULL else None
    err = explain(OSError(failure["errno"], failure["strerror"], failure["filename"]), run_dir, during,
                  cls=StorageError, need=need)
    if err is None:
        return e
    newest = next((p.name for p in candidates(run_dir) if (p / MANIFEST).is_file()), None)
    kept = f"; the newest complete checkpoint {newest} is intact" if newest else "; no checkpoint was completed yet"
    removed = f"{tmp.name} left (removed by the next resume)" if tmp.exists() else f"{tmp.name} removed"
    out = StorageError(run_dir, f"{err.problem}{kept}, {removed}", err.way_out + "; then continue with --resume auto")
    out.__cause__ = own
    return out


@contextlib.contextmanager
def explained(run_dir: str | os.PathLike, file: str | os.PathLike) -> Iterator[None]:
    """Around a write of `file` in RUN_DIR: an OSError the user can fix becomes a one-line StorageError."""
    try:
        yield
    except OSError as e:
        err = explain(e, Path(run_dir), f"while writing {Path(file).name}", cls=StorageError)
        if err is None:
            raise
        raise err from e
