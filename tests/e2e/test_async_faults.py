"""Faults of the asynchronous save: a full disk under the background writer, and kill -9 at random
moments of back-to-back asynchronous saves (snapshot, background write, commit).

A background failure must reach the training process as the same one-line StorageError at each
place a loop meets it (the next save, wait(), check(), the preemption flag's per-step stop(),
close()), with the previous complete checkpoint intact and the temporary folder removed. A kill
must never lose the newest committed checkpoint, nor let a partial one pass as complete; the next
resume removes the partial one. The disk is a real tmpfs of 20 MB (the tests run as root, as CI).
"""

from __future__ import annotations

import random
import time

import pytest
import torch

import graft
from graft.checkpointing import layout
from run_helpers import kill_savers_at_random
from test_faults import assert_all_complete, tmpfs
from test_resume import _Synthetic  # weights that are a function of the checkpoint number

pytestmark = pytest.mark.e2e


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """12.6 MB to save (weights and both AdamW moments): one checkpoint fits 20 MB, two do not."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()
    return model, opt


def _raised(how: str, ckpt: graft.Checkpointer, epoch: int) -> Exception:
    """The background failure, as the loop meets it by `how` (polling for the cheap checks)."""
    deadline = time.time() + 60
    try:
        if how == "wait":
            ckpt.wait()
        elif how == "save":
            ckpt.save(epoch=epoch + 1, step=epoch + 1)
        elif how == "close":
            ckpt.close()
        elif how == "check":
            while time.time() < deadline:
                ckpt.check()
                time.sleep(0.01)
        elif how == "stop":
            with ckpt.preemption() as stop:
                while time.time() < deadline:
                    assert not stop()
                    time.sleep(0.01)
    except Exception as e:  # noqa: BLE001 - the test looks at what came
        return e
    raise AssertionError(f"{how}: no failure raised")


def test_disk_full_in_the_background_is_raised_at_each_check_and_keeps_the_previous(tmp_path):
    model, opt = _model()
    with tmpfs(tmp_path / "small", "20m") as mnt:
        out = mnt / "run"
        ckpt = graft.Checkpointer(out, model=model, optimizer=opt, async_save=True, keep_last=1)
        ckpt.save(epoch=1, step=1)
        ckpt.wait()
        assert assert_all_complete(out) == ["epoch_000001"]
        for i, how in enumerate(["wait", "check", "stop", "save", "close"]):
            epoch = 2 + 2 * i
            assert ckpt.save(epoch=epoch, step=epoch).background  # returns: the failure comes later
            err = _raised(how, ckpt, epoch)
            text = str(err)
            assert isinstance(err, graft.StorageError), (how, repr(err))
            assert "\n" not in text, text
            assert text.startswith(f"{out}: disk full while saving checkpoint {layout.checkpoint_name(epoch)}"), text
            assert "the newest complete checkpoint epoch_000001 is intact" in text, text
            assert f".tmp-{layout.checkpoint_name(epoch)} removed" in text, text
            assert assert_all_complete(out) == ["epoch_000001"], how  # keep_last=1 deleted nothing
        assert ckpt.lock is None  # close() released the folder although the save failed


# -- kill -9 during background writes ------------------------------------------------------------

WORLD = 2


@torch.no_grad()
def _become(model: torch.nn.Module, n: int) -> None:
    for p, q in zip(model.parameters(), _Synthetic(n).parameters()):
        p.copy_(q)


def _train_and_save(run_dir: str, store: str, rank: int, conn) -> None:
    """Child rank: "trains" (the weights become those of checkpoint n, in place) and saves
    asynchronously at every step; the weights change again at once, while the save is written.
    Rank 0 reports each checkpoint known committed (the previous one, once a save returns)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD)
    model = _Synthetic(0)
    ckpt = graft.Checkpointer(run_dir, model=model, async_save=True, keep_last=2)
    dist.barrier()
    conn.send("ready")
    n = int(conn.recv())
    while True:
        n += 1
        _become(model, n)
        ckpt.save(epoch=n, step=n)  # waits for the commit of n - 1 first
        _become(model, -n)  # the next step's weights, written over the saved ones at once
        if rank == 0:
            conn.send(n - 1)


def test_kill_9_during_background_writes_never_loses_a_complete_checkpoint(tmp_path):
    """2 ranks save asynchronously back to back (a write is almost always in flight); both are
    killed at a random moment, one first. The resume (Checkpointer.find: cleans leftovers, checks
    every hash) must pick a checkpoint at least as new as the last one known committed, with
    exactly the weights of its step (not the ones training wrote over them afterwards)."""
    import torch.distributed.fsdp  # noqa: F401 - what Checkpointer imports lazily: once here, not in every child
    from graft.checkpointing.restore import read_logical

    layout.new_hasher()  # the hash module imported here too
    rnd = random.Random(4321)
    run_dir = tmp_path / "run"
    last, trials, leftovers, started = 0, 0, 0, time.time()
    while trials < 22 and time.time() - started < 150:
        last = kill_savers_at_random(_train_and_save, str(run_dir), str(tmp_path / f"store{trials}"), WORLD, last,
                                     rnd, before=(0.05, 0.4), gap=0.03)
        trials += 1
        root = run_dir / layout.CHECKPOINTS
        leftovers += any(p.name.startswith(".") for p in root.iterdir()) if root.is_dir() else 0
        point = graft.Checkpointer(run_dir, lock=False).find("auto")
        assert not root.is_dir() or not [p.name for p in root.iterdir() if p.name.startswith(".")]  # cleaned
        if point is None:
            assert last == 0
            continue
        epoch = int(point.folder.name.split("_")[1])
        assert epoch >= last, (trials, epoch, last)
        for fqn, t in _Synthetic(epoch).named_parameters():  # the parameters are what "training" changes
            assert torch.equal(read_logical(point.manifest, layout.model_name(fqn)), t), (point.folder.name, fqn)
        last = epoch
    assert trials >= 20, f"only {trials} trials in the time bound"
    assert last > 0
    assert leftovers > 0, "no kill landed inside a save: the trials tested nothing"
