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

A run folder on S3 (`S3Lease`) has no kernel lock and no lock that dies with its holder, so
RUN_DIR/.lock is an object holding the owner's record, taken as a LEASE:

- created with a conditional put (If-None-Match: *): of two trainers starting at once, one wins;
- renewed by a thread of the holder every `lease_s / 4` with a conditional put on the ETag it
  last wrote (If-Match): if another process took the lock over meanwhile, the renewal fails,
  the holder learns it lost the folder, and its next save is refused on every rank;
- taken over when it is stale: its last renewal (the object's Last-Modified, the server's
  clock, against this host's: a skew well under the lease is harmless) is older than its
  lease, or its record names a process of this host that is gone (kill -9, as flock would see
  it at once); the takeover is itself conditional (If-Match on the stale object's ETag), so two
  takers cannot both win;
- deleted on release.

A store without conditional writes (they came to AWS S3 in 2024; most S3-compatible stores have
them) answers the first put with "not implemented": the run then goes on without a lock, with a
warning, rather than not at all.

Why not skip it: two trainers on one S3 prefix would delete each other's uploads (a resume
deletes every folder without a manifest, which includes the other's save in progress) and
interleave checkpoints, exactly what the lock prevents on a disk. The cost is one small PUT
per renewal. A crashed holder on another host blocks the folder for at most `lease_s`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

from graft._logging import get_logger
from graft.errors import CheckpointError, GraftError, RunDirLocked
from graft.storage import ConditionalWritesUnsupported, PreconditionFailed, S3Path, as_path, delete, put_if

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


def refusal(run_dir: str | os.PathLike | S3Path, owner: dict | None, mode: str = "flock",
            lock_path: S3Path | None = None) -> RunDirLocked:
    """The error of a start refused because `owner` holds RUN_DIR (`mode`: what told us)."""
    way_out = "wait for that run to finish or stop it, or give this run another train.out_dir"
    if mode == "lease":
        lease = (owner or {}).get("lease_s", LEASE_S)
        way_out += (f"; on S3 the lock is a lease renewed by its holder: if that run is gone it expires "
                    f"{lease:.0f}s after its last renewal, or delete {lock_path} now")
    if mode == "record":
        way_out += (f"; this filesystem has no working flock, so the lock is only the record in "
                    f"{Path(run_dir) / LOCK_FILE}: if that run is gone, delete the file")
    return RunDirLocked(run_dir, f"is in use by another trainer: {describe(owner)}", way_out, owner)


def ensure_free(run_dir: str | os.PathLike | S3Path) -> None:
    """Raise `graft.RunDirLocked` if a trainer holds RUN_DIR now (a check for launchers; takes nothing)."""
    if isinstance(as_path(run_dir), S3Path):
        lease = S3Lease(run_dir)
        found = lease.read()
        if found is not None and not lease.stale(*found):
            raise refusal(run_dir, found[0], "lease", lease.path)
        return
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


# -- S3: a lease ---------------------------------------------------------------------------------

LEASE_S = 60.0
"""How long a run folder on S3 stays locked after its holder's last renewal (renewed every
quarter); $GRAFT_S3_LEASE_S overrides it."""


def _conditional_put(path: S3Path, data: bytes, mode) -> str:
    """Put `data` at `path` only if absent (mode "create") or still at ETag `mode`; the new ETag."""
    return put_if(path, data, if_absent=True) if mode == "create" else put_if(path, data, if_match=mode)


class S3Lease:
    """The lock of a run folder on S3 (see the module doc). `mode` is "lease"; `lost` turns true if
    another process took it over (this one stopped renewing in time), `check()` then raises."""

    mode = "lease"

    def __init__(self, run_dir: str | S3Path, lease_s: float | None = None):
        self.run_dir = S3Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.lease_s = float(lease_s if lease_s is not None else os.environ.get("GRAFT_S3_LEASE_S", LEASE_S))
        self.lost = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> tuple[dict, str | None, float] | None:
        """(record, ETag, seconds since its last renewal) of the lock object, None when there is none."""
        self.path.refresh()  # another process writes it: never a cached answer
        try:
            if not self.path.is_file():
                return None
            info = self.path.stat()
            record = json.loads(self.path.read_bytes() or b"{}")
        except CheckpointError as e:
            if "no such object" in e.problem:
                return None  # released between the two requests
            raise
        except ValueError:
            record = {}  # torn or foreign: judged by its age alone
        return (record if isinstance(record, dict) else {}), info.etag, time.time() - info.st_mtime

    def stale(self, record: dict, etag: str | None, age: float) -> bool:
        """Whether a lock found is free to take: its lease ran out, or its holder is gone from this host."""
        lease = record.get("lease_s", self.lease_s)
        lease = lease if isinstance(lease, (int, float)) else self.lease_s
        # + 1 s: Last-Modified has whole seconds, so an object renewed just now may look 1 s older.
        return age > lease + 1 or alive(record) is False

    def acquire(self) -> "S3Lease":
        """Take the lease or raise `graft.RunDirLocked` naming the holder; then renew it in the background."""
        assert self._thread is None, "acquired twice"
        data = json.dumps({**owner_record(), "lease_s": self.lease_s}).encode()
        try:
            self._etag = _conditional_put(self.path, data, "create")
        except ConditionalWritesUnsupported as e:
            self.mode = "none"
            log.warning("%s: this store has no conditional writes (%s): the run goes on without a lock, so "
                        "nothing stops a second trainer on this folder", self.path, e)
            return self
        except PreconditionFailed:
            found = self.read()
            if found is None:  # released in between: one more try, still conditional
                try:
                    self._etag = _conditional_put(self.path, data, "create")
                except PreconditionFailed:
                    raise refusal(self.run_dir, None, "lease", self.path) from None
            else:
                record, etag, age = found
                if not self.stale(record, etag, age):
                    raise refusal(self.run_dir, record, "lease", self.path) from None
                try:
                    self._etag = _conditional_put(self.path, data, etag)
                except PreconditionFailed:  # another process took it over first
                    now = self.read()
                    raise refusal(self.run_dir, now[0] if now else None, "lease", self.path) from None
                log.warning("%s: the previous owner (%s) ended without releasing it (last renewed %.0fs ago); "
                            "taking over", self.path, describe(record), age)
        self._thread = threading.Thread(target=self._renew, name="graft-s3-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        data = json.dumps({**owner_record(), "lease_s": self.lease_s}).encode()
        while not self._stop.wait(self.lease_s / 4):
            try:
                self._etag = _conditional_put(self.path, data, self._etag)
            except ConditionalWritesUnsupported:
                self.mode = "none"
                log.warning("%s: this store refuses conditional writes: the lock is no longer renewed", self.path)
                return
            except PreconditionFailed:
                self.lost = True
                log.error("%s: another process took this run folder's lock over (this one did not renew it "
                          "within %.0fs); the next save is refused", self.path, self.lease_s)
                return
            except GraftError as e:  # the network: the next renewal may work, the lease has room
                log.warning("%s: could not renew the lock (%s); retrying", self.path, e)

    def check(self) -> None:
        """Raise `graft.RunDirLocked` if the lease was lost (another process holds the folder now)."""
        if self.lost:
            found = self.read()
            raise refusal(self.run_dir, found[0] if found else None, "lease", self.path)

    def release(self) -> None:
        """Stop renewing and delete the lock object (idempotent); a lost lease is left to its new holder."""
        if self._thread is None:
            return  # never held (or held without a lock: a store without conditional writes)
        self._stop.set()
        self._thread.join()
        self._thread = None
        if not self.lost:
            try:
                delete([self.path])
            except GraftError as e:
                log.warning("%s: could not delete the lock (%s); it expires %.0fs after its last renewal",
                            self.path, e, self.lease_s)

    def __enter__(self) -> "S3Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
