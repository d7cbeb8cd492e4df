"""One trainer per run folder: `RUN_DIR/.lock`, held by rank 0 of a job for its whole run.

    with RunDirLock(run_dir):      # or lock = RunDirLock(run_dir).acquire(); ...; lock.release()
        train()

Two trainers on one folder delete each other's temporary folders and interleave checkpoints
and metrics, so the second must refuse at start. The lock is `flock(LOCK_EX | LOCK_NB)` on
RUN_DIR/.lock: the kernel drops it when its process dies (kill -9, OOM, a node reboot), so
a crashed run never leaves the folder locked. The file also holds the owner's record (pid,
host, start time, command, boot id, process start tick) as JSON, read only to name the owner
in the refusal; the record is cleared on release, and a record left by a crashed owner is
reported and overwritten.

The file is never deleted: unlinking a locked file lets a third process lock a new file of
the same name while a second one still holds the old inode.

Network filesystems: Linux NFS turns flock into NFS byte-range locks, which hold across
clients while the lock manager runs; a mount with `nolock` / `local_lock=flock` (and Lustre's
`localflock`) keeps locks local to each node, so two jobs on different nodes can both take
it (each then warns when it finds the other's record). Where the filesystem refuses flock
(Lustre without `-o flock`: ENOSYS; some FUSE mounts), the record alone decides: a record
of a process that is gone on this host (pid absent, pid reused, or another boot) is stale
and taken over; a record of a live process, or of a process on another host (whose liveness
cannot be checked from here), refuses, and the message says to delete RUN_DIR/.lock if that
run is gone. Only rank 0 takes the lock: the other ranks of the same job never touch it, a
second job's rank 0 conflicts with the first's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from graft._logging import get_logger
from graft.errors import RunDirLocked

log = get_logger(__name__)

LOCK_FILE = ".lock"
# flock errors that mean "this filesystem has no (working) flock", not "someone holds it".
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_MAX_COMMAND = 300


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), if readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_record() -> dict:
    """This process, as the lock file records it."""
    pid = os.getpid()
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    if len(command) > _MAX_COMMAND:
        command = command[: _MAX_COMMAND - 3] + "..."
    return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command, "boot_id": _boot_id(), "proc_start": _proc_start(pid)}


def alive(owner: dict) -> bool | None:
    """Is the process of `owner` still running? None when it cannot be told (another host)."""
    if owner.get("host") != socket.gethostname():
        return None
    if owner.get("boot_id") and _boot_id() and owner["boot_id"] != _boot_id():
        return False  # the machine rebooted since: that pid is another process, or none
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    start = _proc_start(pid)
    return not (start is not None and owner.get("proc_start") is not None and start != owner["proc_start"])


def describe(owner: dict | None) -> str:
    """'pid 123 on host h, started 2026-12-02T21:05:41Z (python train.py ...)'."""
    if not owner:
        return "a process whose record is not written yet"
    text = f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
    return text + (f" ({owner['command']})" if owner.get("command") else "")


def _read(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 64 << 10, 0)
        record = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write(fd: int, record: dict | None) -> None:
    data = json.dumps(record).encode() + b"\n" if record else b""
    os.ftruncate(fd, 0)
    if data:
        os.pwrite(fd, data, 0)
    os.fsync(fd)


class RunDirLock:
    """The lock of one run folder (which must exist). `mode` says what holds it: "flock" or "record"."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.mode: str | None = None

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise `graft.RunDirLocked` naming the owner. OSErrors of the folder pass through."""
        assert self.fd is None, "acquired twice"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mode = "flock"
            except BlockingIOError:
                raise refusal(self.run_dir, _read(fd), "flock") from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                mode = "record"
            previous = _read(fd)
            if previous:
                self._take_over(previous, mode)
            _write(fd, owner_record())
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.mode = fd, mode
        return self

    def _take_over(self, previous: dict, mode: str) -> None:
        state = alive(previous)
        if mode == "record" and state is not False:
            raise refusal(self.run_dir, previous, "record")
        if state is None:
            # The kernel granted the lock, yet the record names a process on another host: it
            # crashed there, or this filesystem's locks are local to each node.
            log.warning("%s: took the lock, but it records %s: if that run is still going, this filesystem's "
                        "locks are not shared between nodes; stop one of the two", self.path, describe(previous))
        else:
            log.warning("%s: the previous owner (%s) ended without releasing it (crashed or killed); taking over",
                        self.path, describe(previous))

    def release(self) -> None:
        """Clear the record and drop the lock (idempotent). Process exit drops the kernel lock anyway."""
        if self.fd is None:
            return
        try:
            _write(self.fd, None)
        except OSError as e:  # a full or read-only disk must not turn a finished run into a failure
            log.warning("%s: could not clear the lock record (%s); the next run will take it over", self.path, e)
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = self.mode = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def refusal(run_dir: str | os.PathLike, owner: dict | None, mode: str = "flock") -> RunDirLocked:
    """The error of a start refused because `owner` holds RUN_DIR (`mode`: what told us)."""
    way_out = "wait for that run to finish or stop it, or give this run another train.out_dir"
    if mode == "record":
        way_out += (f"; this filesystem has no working flock, so the lock is only the record in "
                    f"{Path(run_dir) / LOCK_FILE}: if that run is gone, delete the file")
    return RunDirLocked(run_dir, f"is in use by another trainer: {describe(owner)}", way_out, owner)


def ensure_free(run_dir: str | os.PathLike) -> None:
    """Raise `graft.RunDirLocked` if a trainer holds RUN_DIR now (a check for launchers; takes nothing)."""
    owner, mode = _probe(run_dir)
    if owner is not None:
        raise refusal(run_dir, owner, mode)


def holder(run_dir: str | os.PathLike) -> dict | None:
    """The record of the trainer holding RUN_DIR's lock now ({} if it holds it without a record yet),
    or None when the folder is free. Takes nothing."""
    return _probe(run_dir)[0]


def _probe(run_dir: str | os.PathLike) -> tuple[dict | None, str]:
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, "flock"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}, "flock"
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                return None, "flock"
            record = _read(fd)
            return (record if record and alive(record) is not False else None), "record"
        return None, "flock"  # got it: nobody holds it (closing the descriptor drops the shared lock)
    finally:
        os.close(fd)
