"""The run-folder lock (graft.checkpointing.lock) and the OS-error rules of graft.checkpointing.faults.

The end-to-end cases (two real trainers, kill -9, full and read-only disks) are in
tests/e2e/test_faults.py; these pin the rules those rely on, fast.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

import graft
from graft.checkpointing import faults, lock
from graft.checkpointing.lock import LOCK_FILE, RunDirLock


def test_one_holder_at_a_time_and_the_refusal_names_it(tmp_path):
    first = RunDirLock(tmp_path).acquire()
    assert first.mode == "flock"
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    # flock belongs to the open file, so even this same process cannot take it twice.
    with pytest.raises(graft.RunDirLocked, match=rf"is in use by another trainer: pid {os.getpid()} on host") as e:
        RunDirLock(tmp_path).acquire()
    assert isinstance(e.value, graft.RunDirError) and e.value.owner["pid"] == os.getpid()
    assert "\n" not in str(e.value) and "way out: wait for that run to finish" in str(e.value)
    assert lock.holder(tmp_path)["pid"] == os.getpid()
    with pytest.raises(graft.RunDirLocked):
        lock.ensure_free(tmp_path)
    first.release()
    first.release()  # idempotent
    assert (tmp_path / LOCK_FILE).read_text() == "" and lock.holder(tmp_path) is None
    lock.ensure_free(tmp_path)
    with RunDirLock(tmp_path) as again:
        assert again.fd is not None
    assert lock.holder(tmp_path) is None


def _dead_pid() -> int:
    """A pid no process has (none is started: tests/unit starts no processes): the kernel hands out
    pids below pid_max only."""
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def test_liveness_rule_for_records():
    me = lock.owner_record()
    assert lock.alive(me) is True
    assert lock.alive({**me, "pid": _dead_pid()}) is False
    assert lock.alive({**me, "proc_start": me["proc_start"] + 1}) is False  # the pid was reused
    assert lock.alive({**me, "boot_id": "another-boot"}) is False  # the node rebooted since
    assert lock.alive({**me, "host": "some-other-node"}) is None  # cannot be told from here


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem that refuses flock (Lustre without -o flock answers ENOSYS). This machine has
    none, so the one call is made to answer as such a filesystem does; everything else is real."""
    def refuse(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(lock.fcntl, "flock", refuse)


def test_without_flock_the_record_decides(tmp_path, no_flock):
    held = RunDirLock(tmp_path).acquire()
    assert held.mode == "record"
    with pytest.raises(graft.RunDirLocked, match="no working flock.*if that run is gone, delete the file"):
        RunDirLock(tmp_path).acquire()
    with pytest.raises(graft.RunDirLocked, match="delete the file"):
        lock.ensure_free(tmp_path)
    held.release()
    me = lock.owner_record()
    for stale in ({**me, "pid": _dead_pid()}, {**me, "boot_id": "another-boot"}):
        (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
        assert lock.holder(tmp_path) is None
        RunDirLock(tmp_path).acquire().release()  # a crashed owner's record is taken over
    (tmp_path / LOCK_FILE).write_text(json.dumps({**me, "host": "some-other-node"}))
    with pytest.raises(graft.RunDirLocked, match="pid .* on host some-other-node"):
        RunDirLock(tmp_path).acquire()


def test_only_fixable_os_errors_become_one_liners(tmp_path):
    full = faults.explain(OSError(errno.ENOSPC, "No space left on device"), tmp_path, "at start", need=2_500_000)
    assert isinstance(full, graft.RunDirError) and "disk full at start" in str(full)
    assert "a checkpoint needs about 2.5 MB" in str(full) and "keep_last" in str(full)
    quota = faults.explain(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path, "at start")
    assert "disk quota exceeded" in str(quota)
    assert faults.explain(OSError(errno.EIO, "Input/output error"), tmp_path, "at start") is None
    # A save that failed for a reason nobody can fix keeps its own exception (and traceback).
    tmp = tmp_path / "checkpoints" / ".tmp-epoch_000001"
    tmp.mkdir(parents=True)
    eio = OSError(errno.EIO, "Input/output error")
    assert faults.save_failed(tmp_path, tmp, faults.describe_failure(eio), remove=True, own=eio) is eio
    assert not tmp.exists()
    elsewhere = faults.save_failed(tmp_path, tmp, faults.describe_failure(eio, rank=1), remove=False)
    assert type(elsewhere) is OSError and "rank 1 could not write the checkpoint" in str(elsewhere)
    gone = faults.save_failed(tmp_path, tmp, faults.describe_failure(OSError(errno.ENOSPC, "full", "x")),
                              remove=False)
    assert isinstance(gone, graft.StorageError) and "no checkpoint was completed yet" in str(gone)


def test_errors_cross_process_boundaries_unchanged():
    import pickle

    for e in (graft.RunDirError("/r", "p", "w"), graft.StorageError("/r", "p", "w"),
              graft.RunDirLocked("/r", "p", "w", {"pid": 3})):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
    assert pickle.loads(pickle.dumps(graft.RunDirLocked("/r", "p", "w", {"pid": 3}))).owner == {"pid": 3}
    assert {"ConfigError", "RunDirError", "RunDirLocked", "StorageError"} <= set(graft.__all__)
