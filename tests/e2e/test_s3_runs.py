"""Training runs saving to and resuming from s3:// (a real S3-compatible server: moto on 127.0.0.1,
tests/s3_server.py), with the guarantees of a local run folder:

- a run saved to S3 for 2 epochs and resumed (a real `python -m graft.train --resume auto`) to 4
  is bitwise the local run of 4 epochs; 2 processes (DDP under torchrun, gloo) too, and an upload
  failing on one rank fails that save on both with one StorageError and no manifest;
- kill -9 in the middle of a shard's upload (the upload slowed down by a proxy, the kill timed
  by watching the requests reach the server) leaves the previous checkpoint the newest complete
  one; the next resume deletes the incomplete folder's objects and continues bitwise;
- a resume deletes only folders without a manifest, and catches an object replaced after the
  commit by its ETag (the hash check on S3);
- keep_last deletes older complete checkpoints only after the new manifest is there, each
  manifest first; async saves take the same path; the run folder's lock is a lease; a missing
  bucket fails at start in one line.

The child processes get the AWS_* variables the `s3` fixture sets (they inherit os.environ).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("obstore", reason="the [s3] extra (obstore) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

from s3_server import FaultProxy, s3, s3_server  # noqa: E402,F401 - the fixtures

import graft  # noqa: E402
from graft.checkpointing import atomic, layout  # noqa: E402
from graft.checkpointing.lock import S3Lease, owner_record  # noqa: E402
from graft.trainer import run  # noqa: E402
from launch import REPO, child_env, torchrun  # noqa: E402
from run_helpers import state_differences, step_lines, tiny_config, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.e2e
EPOCHS = ("epoch_000002", "epoch_000003", "epoch_000004")


def download(s3, prefix: str, dest: Path) -> Path:
    """Every object under `prefix` of the test's bucket into `dest` (straight from moto, not counted)."""
    for key in s3.keys(prefix + "/"):
        target = dest / key[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get(key))
    return dest


def env_for_children(**extra: str) -> dict[str, str]:
    # The same thread count as this process: float reductions split by threads differ bit-wise.
    return child_env(OMP_NUM_THREADS=str(torch.get_num_threads()), **extra)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The local run that never stopped: 4 epochs in one go (the reference of every comparison)."""
    out = tmp_path_factory.mktemp("local")
    run(tiny_config(out, "train.epochs=4"))
    return out


def assert_same_as_local(s3, local: Path, copy: Path, epochs=EPOCHS) -> None:
    for name in epochs:
        differ = state_differences(local / "checkpoints" / name, copy / "checkpoints" / name)
        assert not differ, (name, differ)
    a, b = step_lines(local), step_lines(copy)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]


# -- a run on S3, resumed from S3 --------------------------------------------------------------

def test_run_saved_to_s3_and_resumed_from_it_is_bitwise_the_local_run(s3, local_run, tmp_path):
    url = s3.url("runs/a")
    first = run(tiny_config(url, "train.epochs=4", "train.session_epochs=2"))
    assert first["run_dir"] == url and first["checkpoint"] == f"{url}/checkpoints/epoch_000002"
    assert not first["finished"]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(tiny_config(url, "train.epochs=4"))  # a fresh run never silently mixes into it
    # The real entry point resumes, in a child process: the AWS_* variables reach it.
    s3.proxy.reset()
    cmd = [sys.executable, "-m", "graft.train", "--resume", "auto", *tiny_overrides(url, "train.epochs=4")]
    proc = subprocess.run(cmd, env=env_for_children(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from {url}/checkpoints/epoch_000002" in proc.stderr
    # `graft resume s3://...` reads the run's config.yaml and the launch shape from there.
    cli = [sys.executable, "-m", "graft.launch.cli", "resume", url, "--epochs", "6", "--dry-run", "--device", "cpu"]
    shown = subprocess.run(cli, env=env_for_children(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "--nproc 1" in shown.stdout and f"--config {url}/config.yaml --resume auto train.out_dir={url}" in shown.stdout

    manifest = json.loads(s3.get("runs/a/checkpoints/epoch_000004/manifest.json"))
    assert all(f.get("etag") for f in manifest["files"].values())  # what the resume checks on S3
    assert {k.split("/")[-1] for k in s3.keys("runs/a/") if "/" not in k[len("runs/a/"):]} == {
        "config.yaml", "metrics.jsonl"}  # the lock is released, no probe left
    copy = download(s3, "runs/a", tmp_path / "copy")
    assert_same_as_local(s3, local_run, copy)
    resumes = [d for d in (json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines())
               if d["event"] == "resume"]
    assert [r["step"] for r in resumes] == [8]


def test_two_processes_ddp_save_to_s3_resume_and_fail_together(s3, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on: rank 1's uploads are refused there
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    url = s3.url("runs/ddp")
    torchrun(REPO / "tests/e2e/scripts/s3_ddp.py", tmp_path, url, dead, nproc=2, timeout=300,
             env=env_for_children())
    summaries = json.loads((tmp_path / "summaries.json").read_text())
    assert summaries["second"]["world_size"] == 2 and summaries["second"]["strategy"] == "ddp"
    assert summaries["second"]["resumed_from"] == f"{url}/checkpoints/epoch_000001"
    copy = download(s3, "runs/ddp", tmp_path / "copy")
    for name in ("epoch_000001", "epoch_000002"):
        assert not state_differences(tmp_path / "straight/checkpoints" / name, copy / "checkpoints" / name), name
    manifest = json.loads((copy / "checkpoints/epoch_000002/manifest.json").read_text())
    assert {"shards/rank_00000.safetensors", "shards/rank_00001.safetensors"} <= set(manifest["files"])
    a, b = step_lines(tmp_path / "straight"), step_lines(copy)
    assert [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(a)] and sorted(a) == sorted(b)

    errors = [json.loads((tmp_path / f"fail_rank{r}.json").read_text()) for r in (0, 1)]
    assert errors[0] == errors[1] and errors[0]["type"] == "StorageError", errors
    message = errors[0]["message"]
    assert "saving checkpoint epoch_000002 failed on rank 1" in message and "rank_00001.safetensors" in message
    assert "no manifest was written" in message and "epoch_000001 is intact" in message
    # Nothing of the failed save is left (rank 0's upload deleted too); the first save is whole.
    assert s3.keys("runs/fail/checkpoints/epoch_000002/") == []
    assert "runs/fail/checkpoints/epoch_000001/manifest.json" in s3.keys("runs/fail/")


# -- kill -9 during an upload ------------------------------------------------------------------

class _Slowed:
    """A socket whose recv() is paced to `proxy.rate` bytes per second while that is set."""

    def __init__(self, sock: socket.socket, proxy: "SlowProxy"):
        self.sock, self.proxy = sock, proxy

    def recv(self, n: int) -> bytes:
        rate = self.proxy.rate
        data = self.sock.recv(min(n, 8192) if rate else n)
        if rate and data:
            time.sleep(len(data) / rate)
        return data


class SlowProxy(FaultProxy):
    """The tests' proxy, able to slow what clients send (uploads) to `rate` bytes per second."""

    rate: float | None = None

    def _pump(self, src, dst, down, pair):
        super()._pump(src if down else _Slowed(src, self), dst, down, pair)


def _wait_for(proc, proxy, needle: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not any(needle in r for r in proxy.requests):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, f"no request for {needle} in {timeout}s: {proxy.requests[-5:]}"
        time.sleep(0.01)


def test_kill_9_during_a_shard_upload_keeps_the_previous_checkpoint(s3, s3_server, local_run, tmp_path):
    proxy = SlowProxy(("127.0.0.1", s3_server.port))
    staging = tmp_path / "staging"
    url = s3.url("runs/k")
    try:
        env = env_for_children(AWS_ENDPOINT_URL=proxy.endpoint, GRAFT_STAGING_DIR=str(staging))
        cmd = [sys.executable, "-m", "graft.train", *tiny_overrides(url, "train.epochs=4")]
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for(proc, proxy, "/runs/k/checkpoints/epoch_000001/manifest.json")
            proxy.rate = 50_000  # the second checkpoint's shard (~0.5 MB) now takes ~10 s to upload
            _wait_for(proc, proxy, "/runs/k/checkpoints/epoch_000002/shards/rank_00000.safetensors")
            time.sleep(0.5)  # well inside the upload
            assert proc.poll() is None
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    finally:
        proxy.close()

    left = s3.keys("runs/k/checkpoints/epoch_000002/")
    assert left and not any(k.endswith(("manifest.json", ".safetensors")) for k in left), left
    assert any(p.name.startswith("graft-staging-") for p in staging.iterdir())  # the killed upload's
    folder, skipped = layout.newest_complete(url)
    assert str(folder) == f"{url}/checkpoints/epoch_000001"
    assert [(p.name, why) for p, why in skipped] == [("epoch_000002", "has no manifest.json: the save did not finish")]
    assert s3.keys("runs/k/.lock")  # the killed trainer's lease: same host, its pid gone, taken over at once

    # The next resume (rank 0 of a real run) deletes the incomplete folder, then continues bitwise.
    os.environ["GRAFT_STAGING_DIR"] = str(staging)  # monkeypatched env of the s3 fixture: restored after
    try:
        summary = run(tiny_config(url, "train.epochs=4"), resume="auto")
    finally:
        del os.environ["GRAFT_STAGING_DIR"]
    assert summary["resumed_from"] == f"{url}/checkpoints/epoch_000001" and summary["finished"]
    assert not [p for p in staging.iterdir() if p.name.startswith("graft-staging-")]
    copy = download(s3, "runs/k", tmp_path / "copy")
    assert_same_as_local(s3, local_run, copy)


def test_resume_deletes_incomplete_folders_only(s3):
    """What a resume cleans on S3: every checkpoint folder without a manifest; a complete one, a
    folder with a bad manifest (kept, like on a disk, and skipped) and other keys stay."""
    model = torch.nn.Linear(8, 8)
    url = s3.url("runs/c")
    with graft.Checkpointer(url, model=model) as ckpt:
        ckpt.save(epoch=1, step=1)
    s3.put("runs/c/checkpoints/epoch_000002/shards/rank_00000.safetensors", b"partial")
    s3.put("runs/c/checkpoints/epoch_000002_step_000009/train_state.json", b"{}")
    s3.put("runs/c/checkpoints/epoch_000003/manifest.json", b"not json")
    s3.put("runs/c/checkpoints/notes/readme.txt", b"mine")
    with graft.Checkpointer(url, model=model) as ckpt:
        point = ckpt.find("auto")
    assert point.folder.name == "epoch_000001"
    keys = s3.keys("runs/c/checkpoints/")
    assert not [k for k in keys if "epoch_000002" in k]
    assert "runs/c/checkpoints/epoch_000003/manifest.json" in keys and "runs/c/checkpoints/notes/readme.txt" in keys


def test_an_object_replaced_after_the_commit_is_caught_by_its_etag(s3):
    """On S3 a resume checks sizes and ETags (not BLAKE3: that would download every byte): an object
    rewritten after the commit, even with the same size, makes its checkpoint incomplete."""
    model = torch.nn.Linear(8, 8)
    url = s3.url("runs/e")
    with graft.Checkpointer(url, model=model) as ckpt:
        ckpt.save(epoch=1, step=1)
        ckpt.save(epoch=2, step=2)
    key = "runs/e/checkpoints/epoch_000002/train_state.json"
    s3.put(key, s3.get(key).replace(b'"step": 2', b'"step": 3'))  # same size, other bytes
    folder, skipped = layout.newest_complete(url)
    assert folder.name == "epoch_000001" and [p.name for p, _ in skipped] == ["epoch_000002"]
    assert skipped[0][1].startswith("train_state.json was replaced after the save (ETag"), skipped
    with graft.Checkpointer(url, model=model) as ckpt:
        assert ckpt.find("auto").folder.name == "epoch_000001"
    assert key in s3.keys("runs/e/")  # it has a manifest: skipped and named, not deleted


# -- keep_last, async saves, the lock ------------------------------------------------------------

def test_keep_last_deletes_older_complete_checkpoints_after_the_commit(s3, monkeypatch):
    url = s3.url("runs/r")
    calls = []
    real_delete = atomic.delete

    def spy(paths):
        paths = list(paths)
        calls.append(([str(p) for p in paths], set(s3.keys("runs/r/checkpoints/"))))
        real_delete(paths)

    monkeypatch.setattr(atomic, "delete", spy)
    model = torch.nn.Linear(64, 64)
    s3.put("runs/r/checkpoints/epoch_000000_step_000005/train_state.json", b"{}")  # incomplete: not rotated
    with graft.Checkpointer(url, model=model, keep_last=2) as ckpt:
        for e in range(1, 5):
            result = ckpt.save(epoch=e, step=e)
            assert result.deleted == ([] if e <= 2 else [layout.checkpoint_name(e - 2)])
    rotations = [(paths, before) for paths, before in calls if paths]
    assert len(rotations) == 4  # 2 rotations: the manifest alone, then the rest
    for i, e in enumerate((3, 4)):
        (first, before), (rest, _) = rotations[2 * i], rotations[2 * i + 1]
        old = f"{url}/checkpoints/{layout.checkpoint_name(e - 2)}"
        assert first == [f"{old}/manifest.json"]  # uncommitted first
        assert f"runs/r/checkpoints/{layout.checkpoint_name(e)}/manifest.json" in before  # after the commit
        assert rest and all(p.startswith(old + "/") for p in rest)
    names = {k.split("/")[3] for k in s3.keys("runs/r/checkpoints/")}
    assert names == {"epoch_000003", "epoch_000004", "epoch_000000_step_000005"}


def test_async_save_to_s3_takes_the_same_path(s3, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)
    opt = torch.optim.AdamW(model.parameters())
    url = s3.url("runs/async")
    with graft.Checkpointer(url, model=model, optimizer=opt, async_save=True) as ckpt:
        model(torch.randn(4, 128)).sum().backward()
        opt.step()
        want = {k: v.clone() for k, v in model.state_dict().items()}
        assert ckpt.save(epoch=1, step=1).background
        with torch.no_grad():
            model.weight.add_(1.0)  # after the snapshot: not in the checkpoint
        result = ckpt.wait()
    assert str(result.folder) == f"{url}/checkpoints/epoch_000001"
    fresh = torch.nn.Linear(128, 128)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    with graft.Checkpointer(url, model=fresh, optimizer=fresh_opt) as ckpt:
        start = ckpt.resume("auto")
    assert start.epoch == 1 and all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())


def test_the_lock_of_an_s3_run_folder_is_a_lease(s3):
    url = s3.url("runs/l")
    model = torch.nn.Linear(4, 4)
    with graft.Checkpointer(url, model=model):
        with pytest.raises(graft.RunDirLocked, match=rf"in use by another trainer: pid {os.getpid()}.*runs/l/\.lock"):
            graft.Checkpointer(url, model=model)
    # Released on close; a crashed holder of this host (pid gone) is taken over at once, a live
    # holder elsewhere only once its lease has run out.
    dead = {**owner_record(), "pid": 2**22 + 17, "proc_start": None, "lease_s": 60}
    s3.put("runs/l/.lock", json.dumps(dead).encode())
    with graft.Checkpointer(url, model=model):
        pass
    elsewhere = {**owner_record(), "host": "another-host", "lease_s": 0.5}
    s3.put("runs/l/.lock", json.dumps(elsewhere).encode())
    with pytest.raises(graft.RunDirLocked, match="another-host"):
        S3Lease(url).acquire()
    time.sleep(2.1)  # the lease, and a second more: S3's Last-Modified has whole seconds
    lease = S3Lease(url, lease_s=0.4).acquire()
    try:
        time.sleep(0.5)  # renewed every lease_s / 4 meanwhile
        assert not lease.lost
        s3.put("runs/l/.lock", b"{}")  # another process took it over
        deadline = time.time() + 5
        while not lease.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lease.lost
        with pytest.raises(graft.RunDirLocked):
            lease.check()
    finally:
        lease.release()
    assert s3.keys("runs/l/.lock")  # a lost lease is left to its new holder


def test_a_missing_bucket_fails_at_start_in_one_line(s3):
    with pytest.raises(graft.RunDirError) as info:
        graft.Checkpointer("s3://graft-no-such-bucket/run", model=torch.nn.Linear(2, 2))
    message = str(info.value)
    assert message.startswith("s3://graft-no-such-bucket/run: cannot hold checkpoints (at start:")
    assert "does not exist" in message and "way out:" in message and "\n" not in message
