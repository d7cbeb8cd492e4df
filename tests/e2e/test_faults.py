"""Faults of the run folder, end to end: disk full during a save, an unwritable out_dir (three ways), two
trainers on one folder, a lock left by kill -9.

Each failing start or save must give ONE `error:` line on stderr naming the folder and the way out,
exit code 2, no traceback, and lose nothing: the previous complete checkpoint still passes its
manifest hashes, and `--resume auto` works afterwards where that makes sense. The faults are real:
tmpfs mounts of a given size or read-only (the tests run as root, as CI does), a child process run
as `nobody` for the permission case (root ignores permission bits), real `train.py` / `graft train`
processes for everything that prints or exits.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import graft
from graft.checkpointing import faults
from graft.checkpointing.lock import LOCK_FILE
from graft.checkpointing.layout import candidates, problem
from graft.trainer import run
import launch
from launch import BIN, REPO
from run_helpers import events, step_lines, tiny_config, tiny_overrides

pytestmark = pytest.mark.e2e

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


# -- helpers ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, ro: bool = False):
    """A tmpfs of `size` mounted at `where` for the block (needs root, as CI runs)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)


def train_py(out_dir, *extra: str, prefix: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*prefix, sys.executable, str(REPO / "train.py"), *tiny_overrides(out_dir, *extra)]
    return launch.run(cmd, env=env or launch.child_env(), check=False, timeout=240)


def graft_train(config_dir: Path, out_dir, nproc: int = 1, *extra: str) -> list[str]:
    """`graft train` of the tiny run into `out_dir` (its config: the defaults, plus the overrides)."""
    config = config_dir / "run.yaml"
    config.write_text("{}\n")
    return [str(BIN / "graft"), "train", "--config", str(config), "--nproc", str(nproc), "--device", "cpu",
            *tiny_overrides(out_dir, *extra)]


def one_error_line(proc: subprocess.CompletedProcess, prefix: str = "error: ") -> str:
    """The single error line of a failed start or save; exit 2, no traceback anywhere."""
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 2, output
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, output
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output
    return lines[0]


def assert_all_complete(run_dir: Path) -> list[str]:
    """Every checkpoint folder of the run passes its manifest (sizes and sha256); no leftovers."""
    root = run_dir / "checkpoints"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], sorted(os.listdir(root))
    names = [p.name for p in candidates(run_dir)]
    for p in candidates(run_dir):
        assert problem(p, hashes=True) is None, (p, problem(p, hashes=True))
    return names


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished first epoch (of 3): what the faults below must not lose."""
    out = tmp_path_factory.mktemp("base") / "run"
    run(tiny_config(out, "train.epochs=3", "train.session_epochs=1"))
    return out


# -- disk full during a save -----------------------------------------------------------------------

def test_disk_full_during_a_save_via_graft_train(base_run, tmp_path):
    """Through `graft train` (accelerate launch, one process): the launcher passes the trainer's one
    line and exit code 2 on. The tmpfs holds the first checkpoint (556 kB) but not a second one."""
    with tmpfs(tmp_path / "small", "900k") as mnt:
        out = mnt / "run"
        proc = launch.run(graft_train(tmp_path, out, 1, "train.epochs=3"), check=False, timeout=240)
        line = one_error_line(proc)
        assert f"{out}: disk full while saving checkpoint epoch_000002" in line, line
        files = json.loads((out / "checkpoints/epoch_000001/manifest.json").read_text())["files"]
        need = sum(f["size"] for f in files.values())
        assert f"free, a checkpoint needs about {need / 1000:.1f} kB)" in line, line
        assert "epoch_000001 is intact" in line and ".tmp-epoch_000002 removed" in line, line
        assert "train.out_dir" in line and "keep_last" in line and "--resume auto" in line, line
        assert assert_all_complete(out) == ["epoch_000001"]
        assert (out / LOCK_FILE).read_text() == ""  # released on the way out
        # Space freed (here: a bigger disk), the run continues where it stopped.
        remount(mnt, "size=8m")
        summary = run(tiny_config(out, "train.epochs=3"), resume="auto")
        assert summary["finished"] and summary["resumed_from"].endswith("epoch_000001")
        assert assert_all_complete(out) == ["epoch_000003", "epoch_000002", "epoch_000001"]


@pytest.mark.distributed
def test_disk_full_in_a_two_process_job_stops_every_rank_with_the_same_line(tmp_path):
    """DDP on 2 processes: rank 0 writes the shared files and hits the full disk; every rank learns
    it at the same point, rank 0 removes the temporary folder, both print the same one line, and
    `graft train` exits 2 with that line last, after the launcher's own failure report."""
    with tmpfs(tmp_path / "small", "900k") as mnt:
        out = mnt / "run"
        proc = launch.run(graft_train(tmp_path, out, 2, "train.epochs=3"), check=False, timeout=300)
        output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        assert proc.returncode == 2, output
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        # One per rank and the same, unless the launcher stopped a rank (SIGTERM) as soon as the
        # other exited, before it printed.
        assert len(lines) in (1, 2) and len(set(lines)) == 1, output
        assert f"{out}: disk full while saving checkpoint epoch_000002" in lines[0], lines[0]
        assert "epoch_000001 is intact, .tmp-epoch_000002 removed" in lines[0], lines[0]
        assert proc.stderr.rstrip().splitlines()[-1] == "graft: " + lines[0], output
        # The launcher prints a traceback of its own (ChildFailedError); the ranks print none.
        assert 'train.py", line' not in proc.stderr and "graft/trainer" not in proc.stderr, output
        assert assert_all_complete(out) == ["epoch_000001"]


def test_disk_full_at_the_manifest_keeps_the_previous_checkpoint(tmp_path):
    """The commit's own writes (manifest.json, written last) hit the full disk: the same one-line
    error, naming the manifest; the previous checkpoint stays complete. The real writer, on a tmpfs
    filled up to its last byte once the checkpoint's files are in."""
    import torch

    from graft.checkpointing import layout
    from graft.checkpointing.atomic import AtomicCheckpoint
    from graft.checkpointing.layout import FileEntry, Piece, TensorEntry
    from graft.checkpointing.shard_writer import write_bytes, write_shard

    def files(tmp, value) -> dict:
        shard = layout.shard_file(0)
        w = write_shard(tmp / shard, [("model/w[0:4096]", torch.full((4096,), value))])
        t = write_bytes(tmp / layout.TRAIN_STATE, json.dumps({"epoch": int(value)}).encode())
        return layout.manifest_json(
            {shard: FileEntry(w.size, w.hash, w.algo, 0), layout.TRAIN_STATE: FileEntry(t.size, t.hash, t.algo)},
            {"model/w": TensorEntry((64, 64), torch.float32, [Piece(shard, w.offsets["model/w[0:4096]"], 0, 4096)])},
            world_size=1, strategy="single", info={"epoch": int(value), "step": int(value)})

    with tmpfs(tmp_path / "small", "1m") as mnt:
        first = AtomicCheckpoint(mnt, "epoch_000001")
        first.commit(files(first.begin(), 1.0))
        second = AtomicCheckpoint(mnt, "epoch_000002")
        manifest = files(second.begin(), 2.0)
        with open(mnt / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        with pytest.raises(OSError) as caught:
            second.commit(manifest)
        assert caught.value.errno == errno.ENOSPC
        err = faults.save_failed(mnt, second.tmp, faults.describe_failure(caught.value), remove=True,
                                 own=caught.value)
        assert isinstance(err, graft.StorageError), err
        text = str(err)
        assert text.startswith(f"{mnt}: disk full while saving checkpoint epoch_000002 (writing manifest.json)")
        assert "epoch_000001 is intact, .tmp-epoch_000002 removed" in text and "\n" not in text
        (mnt / "filler").unlink()
        assert assert_all_complete(mnt) == ["epoch_000001"]


# -- unwritable out_dir ----------------------------------------------------------------------------

def test_out_dir_under_a_regular_file(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    out = tmp_path / "notes.txt" / "run"
    line = one_error_line(train_py(out))
    assert f"error: {out}: cannot be the run folder (at start): {tmp_path / 'notes.txt'} is a regular file" in line
    assert "way out: remove or rename that file, or set train.out_dir" in line
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder\n"


def test_out_dir_on_a_read_only_filesystem(base_run, tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as mnt:
        out = mnt / "run"
        shutil.copytree(base_run, out)
        remount(mnt, "ro")
        line = one_error_line(train_py(out, "train.epochs=3", "--resume", "auto"))
        assert f"error: {out}: is on a read-only filesystem (at start)" in line, line
        assert "way out: remount it read-write, or set train.out_dir" in line
        assert assert_all_complete(out) == ["epoch_000001"]
        remount(mnt, "rw")
        summary = run(tiny_config(out, "train.epochs=2"), resume="auto")
        assert summary["finished"] and assert_all_complete(out) == ["epoch_000002", "epoch_000001"]


def test_out_dir_without_write_permission(base_run):
    """The child runs as `nobody` (root ignores permission bits). pytest's tmp_path sits under a
    0700 folder of root's, so this test makes its own 0755 folder under /tmp; the venv and the
    worktree are world-readable (checked first)."""
    probe = launch.run([*NOBODY, sys.executable, "-c", "import graft.trainer"], check=False, env=launch.child_env())
    assert probe.returncode == 0, f"nobody cannot import graft from {REPO}: {probe.stderr[-2000:]}"
    top = Path(tempfile.mkdtemp(prefix="graft-perm-"))
    try:
        top.chmod(0o755)
        home = top / "home"  # nobody's HOME (/nonexistent): caches go here, not into the run folder
        home.mkdir(mode=0o777)
        home.chmod(0o777)
        out = top / "run"
        shutil.copytree(base_run, out)
        before = {p.name: json.loads((p / "manifest.json").read_text()) for p in candidates(out)}
        line = one_error_line(train_py(out, "train.epochs=3", "--resume", "auto", prefix=NOBODY,
                                       env=launch.child_env(HOME=str(home))))
        assert f"error: {out}: no write permission for user nobody (uid 65534) (at start)" in line, line
        assert f"{out} is owned by uid 0, mode 0755" in line and "way out: make the folder writable" in line
        assert {p.name: json.loads((p / "manifest.json").read_text()) for p in candidates(out)} == before
        assert assert_all_complete(out) == ["epoch_000001"]
    finally:
        shutil.rmtree(top, ignore_errors=True)


# -- two trainers on one folder; a lock left by kill -9 --------------------------------------------

def wait_for_lock(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """The owner record `proc` wrote into RUN_DIR/.lock once it holds the lock."""
    deadline = time.time() + timeout
    path = run_dir / LOCK_FILE
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().strip():
            record = json.loads(path.read_text())
            if record["pid"] == proc.pid:
                return record
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    raise AssertionError(f"no lock by pid {proc.pid} in {timeout}s (exit {proc.poll()}): {out}\n{err}")


def test_second_trainer_refuses_while_the_first_runs_and_kill_9_frees_the_lock(tmp_path, caplog):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *tiny_overrides(out, "train.epochs=3")],
                             env=launch.child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        owner = wait_for_lock(out, first)
        # Held still while the others try: the refusal then never depends on how fast this machine is.
        # A stopped process keeps its lock like a running one.
        first.send_signal(signal.SIGSTOP)
        # `graft train` refuses too, before starting any launcher (run beside the second trainer).
        cli = subprocess.Popen(graft_train(tmp_path, out), env=launch.child_env(), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        second = train_py(out, "train.epochs=3", "train.seed=11")
        line = one_error_line(second)
        assert f"error: {out}: is in use by another trainer: pid {first.pid} on host {owner['host']}" in line, line
        assert f"started {owner['started']}" in line and "train.py" in line, line
        assert "way out: wait for that run to finish or stop it, or give this run another train.out_dir" in line
        cli_out, cli_err = cli.communicate(timeout=120)
        cli_line = one_error_line(subprocess.CompletedProcess(cli.args, cli.returncode, cli_out, cli_err),
                                  "graft: error: ")
        assert f"is in use by another trainer: pid {first.pid}" in cli_line and "$ " not in cli_out, cli_out
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert "done: epoch 3" in stdout
    assert assert_all_complete(out) == ["epoch_000003", "epoch_000002", "epoch_000001"]
    steps = [d["step"] for d in events(out, "step")]
    assert steps == sorted(set(steps)) == sorted(step_lines(out)), steps  # one writer: no doubled lines
    assert (out / LOCK_FILE).read_text() == ""

    # A trainer killed with -9 while it holds the lock: the kernel drops the lock with the process,
    # and the next start takes it over (its stale record is reported, not obeyed).
    killed = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--resume", "auto",
                               *tiny_overrides(out, "train.epochs=6")], env=launch.child_env(), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock(out, killed)
    finally:
        killed.kill()
        killed.wait(60)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == killed.pid  # its record stays behind
    with caplog.at_level(logging.WARNING, logger="graft.checkpointing.lock"):
        summary = run(tiny_config(out, "train.epochs=4"), resume="auto")
    assert summary["finished"] and summary["resumed_from"].endswith("epoch_000003")
    assert f"previous owner (pid {killed.pid} on host" in caplog.text and "taking over" in caplog.text
    assert assert_all_complete(out)[0] == "epoch_000004"
