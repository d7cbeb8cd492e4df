"""Resume and extension, single process: exact continuation, each extension policy, SIGTERM, kill -9,
and `graft plot` of a real resumed run.

The runs are tiny (tiny_vgg, 32x32 digits, 240 samples, 4 steps per epoch) and run in this
process, except the SIGTERM case (a real `python train.py`) and the kill -9 trials (forked
children killed while they save).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time

import pytest
import torch

from graft.errors import CheckpointError
from graft.launch.plot import plot_run
from graft.trainer import run
from launch import REPO
from run_helpers import events, kill_savers_at_random, run_and_sigterm, state_differences, step_lines, tiny_config, tiny_overrides

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run that never stopped: 4 epochs in one go."""
    out = tmp_path_factory.mktemp("straight")
    summary = run(tiny_config(out, "train.epochs=4"))
    return out, summary


def test_half_then_resume_is_bitwise_the_straight_run(straight, tmp_path):
    ref, ref_summary = straight
    first = run(tiny_config(tmp_path, "train.epochs=4", "train.session_epochs=2"))
    assert first["epochs_done"] == 2 and not first["finished"]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(tiny_config(tmp_path, "train.epochs=4"))  # never silently mixes a fresh run in
    second = run(tiny_config(tmp_path, "train.epochs=4"), resume="auto")
    assert second["resumed_from"].endswith("epoch_000002") and second["finished"]
    for epoch in (2, 3, 4):
        name = f"checkpoints/epoch_{epoch:06d}"
        assert not state_differences(tmp_path / name, ref / name), name
    a, b = step_lines(ref), step_lines(tmp_path)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    assert [a[s]["lr"] for s in a] == [b[s]["lr"] for s in a]
    assert second["val_accuracy"] == ref_summary["val_accuracy"]
    assert events(tmp_path, "resume")[0]["step"] == 8


def test_resume_refuses_a_changed_config_unless_allowed(straight, tmp_path):
    ref, _ = straight
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from"):
        run(tiny_config(tmp_path, "train.epochs=4"), resume="auto")  # never silently starts fresh
    with pytest.raises(ValueError, match=r"optimizer\.lr: 0\.003 -> 0\.001"):
        run(tiny_config(ref, "train.epochs=4", "optimizer.lr=0.001"), resume="auto")
    summary = run(tiny_config(ref, "train.epochs=4", "optimizer.lr=0.001"), resume=str(ref / "checkpoints/epoch_000004"),
                  allow_config_change=True)
    assert summary["epochs_done"] == 4 and summary["config_changes"] == {"optimizer.lr": [0.003, 0.001]}


def _expected_lr(policy: str, step: int, spe: int, base=0.003, warm=3, m=0.1) -> float:
    """What each policy promises for step `step` (0-based) of a 5-epoch run extended to 10."""
    def cosine(s, start, end):
        if s - start < warm:
            return base * (s - start + 1) / warm
        p = min(1.0, (s - start - warm) / (end - start - warm))
        return base * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))
    if step < 5 * spe or policy == "continue":
        return cosine(step, 0, 5 * spe)
    if policy == "restart":
        return cosine(step, 5 * spe, 10 * spe)
    return cosine(step, 0, 10 * spe)  # stretch: as if 10 epochs had been configured


@pytest.fixture(scope="module")
def five_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("five")
    run(tiny_config(out, "train.epochs=5"))
    return out


@pytest.mark.parametrize("policy", ["continue", "restart", "stretch"])
def test_extend_5_to_10_epochs(five_epochs, tmp_path, policy):
    import shutil

    shutil.copytree(five_epochs, tmp_path / "run")
    out = tmp_path / "run"
    summary = run(tiny_config(out, "train.epochs=10", f"schedule.on_extend={policy}"), resume="auto")
    spe = summary["steps_per_epoch"]
    assert summary["epochs_done"] == 10 and summary["step"] == 10 * spe
    assert summary["extension"]["policy"] == policy and summary["extension"]["at_step"] == 5 * spe
    assert [e["epoch"] for e in events(out, "epoch")] == list(range(1, 11))
    lines = step_lines(out)
    assert sorted(lines) == list(range(1, 10 * spe + 1))
    for s, line in lines.items():
        assert line["lr"] == pytest.approx(_expected_lr(policy, s - 1, spe), rel=1e-12), (policy, s)
    assert events(out, "extend")[0]["policy"] == policy
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"epoch_{e:06d}" for e in range(1, 11)]


def test_sigterm_mid_epoch_then_resume_equals_never_stopped(tmp_path):
    extra = ["train.epochs=2", "train.max_steps_per_epoch=null", "data.limit=400", "data.batch_size=16"]
    ref = tmp_path / "ref"
    run(tiny_config(ref, *extra))
    out = tmp_path / "stopped"
    cmd = [sys.executable, str(REPO / "train.py"), *tiny_overrides(out, *extra)]
    # The same thread count as this process: float reductions split by threads differ bit-wise.
    metrics = out / "metrics.jsonl"
    # SIGTERM at step 4 of 20 in epoch 1.
    run_and_sigterm(cmd, lambda: metrics.exists() and sum(1 for _ in metrics.open()) >= 4, poll=0.02)
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and "_step_" in saved[0], saved  # mid-epoch: epoch_000000_step_0000NN
    state = json.loads((out / "checkpoints" / saved[0] / "train_state.json").read_text())
    assert 0 < state["batch_in_epoch"] < 20
    assert events(out, "preempt")[0]["signal"] == "SIGTERM"
    summary = run(tiny_config(out, *extra), resume="auto")
    assert summary["finished"]
    for name in ("epoch_000001", "epoch_000002"):
        assert not state_differences(out / "checkpoints" / name, ref / "checkpoints" / name)
    a, b = step_lines(ref), step_lines(out)
    assert [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(a)]


# -- the plot of a resumed run ------------------------------------------------------------

def test_plot_of_a_real_resumed_run(tmp_path):
    """A tiny real run (the trainer writes metrics.jsonl), extended once: the resume is where it picked up."""
    pytest.importorskip("sklearn")
    from graft.config import load_config

    run_dir = tmp_path / "tiny"
    over = [f"train.out_dir={run_dir}", "data.limit=96", "data.batch_size=16", "train.progress=false",
            "train.log_every=1", "model.factory=graft.models:tiny_vgg", "model.kwargs={num_classes: 10}"]
    run(load_config(None, [*over, "train.epochs=2"]))
    summary = run(load_config(None, [*over, "train.epochs=3"]), resume="auto")
    assert summary["epochs_done"] == 3
    res = plot_run(run_dir, tmp_path / "tiny.png")
    steps_per_epoch = summary["steps_per_epoch"]
    assert res.resume_steps == [2 * steps_per_epoch]
    assert res.n_epochs == 3 and res.n_steps == 3 * steps_per_epoch
    assert res.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- kill -9 during saves ----------------------------------------------------------------

KILL_WORLD = 3


class _Synthetic(torch.nn.Module):
    """Weights that are a function of the checkpoint number: what a resume finds can be checked."""

    def __init__(self, n: int):
        super().__init__()
        g = torch.Generator().manual_seed(n)
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(256, 256, generator=g)) for _ in range(6)])
        self.register_buffer("n", torch.tensor(n))


def _save_forever(run_dir: str, store: str, rank: int, conn) -> None:
    """Child rank: commit sharded checkpoints back to back (the real save, rotation included);
    rank 0 reports each commit."""
    import torch.distributed as dist

    from graft.checkpointing import layout
    from graft.checkpointing.save import save
    from graft.checkpointing.torch_adapter import TorchAdapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, KILL_WORLD), rank=rank, world_size=KILL_WORLD)
    dist.barrier()  # connections up before the clock starts
    conn.send("ready")
    n = int(conn.recv())
    while True:
        n += 1
        files = {layout.TRAIN_STATE: {"epoch": n}} if rank == 0 else None
        save(run_dir, layout.checkpoint_name(n), TorchAdapter(_Synthetic(n), None, "ddp"), files=files,
             rank_tensors={layout.rank_name(rank, "x"): torch.full((1000,), float(rank))}, keep_last=2)
        if rank == 0:
            conn.send(n)


def test_kill_9_during_sharded_saves_never_loses_a_complete_checkpoint(tmp_path):
    """3 ranks save back to back; all are killed at a random moment (one first, then the others,
    so ranks die at different points of the save). Resume must find the newest committed
    checkpoint, complete: every rank's shard there and every logical tensor right."""
    from graft.checkpointing import layout, save  # noqa: F401 - imported once here, not in every child
    from graft.checkpointing.atomic import clean_leftovers
    from graft.checkpointing.restore import read_logical
    from graft.checkpointing.torch_adapter import TorchAdapter  # noqa: F401

    layout.new_hasher()  # the hash module imported here too

    rnd = random.Random(1234)
    run_dir = str(tmp_path / "run")
    last_committed = 0
    trials, leftovers, started = 0, 0, time.time()
    while trials < 24 and time.time() - started < 150:
        last_committed = kill_savers_at_random(_save_forever, run_dir, str(tmp_path / f"store{trials}"), KILL_WORLD,
                                               last_committed, rnd, before=(0.02, 0.4), gap=0.05)
        trials += 1
        # What resume-auto does: clean leftovers, pick the newest complete checkpoint.
        leftovers += bool(clean_leftovers(run_dir))
        if last_committed == 0:
            continue
        folder, skipped = layout.newest_complete(run_dir, hashes=True)
        assert folder is not None, skipped
        m = layout.read_manifest(folder)
        epoch = int(folder.name.split("_")[1])
        assert epoch >= last_committed, (trials, epoch, last_committed, skipped)
        assert m.world_size == KILL_WORLD and all((folder / layout.shard_file(r)).is_file() for r in range(KILL_WORLD))
        want = _Synthetic(epoch).state_dict()
        for fqn, t in want.items():
            assert torch.equal(read_logical(m, layout.model_name(fqn)), t), (folder.name, fqn)
        for r in range(KILL_WORLD):
            assert torch.equal(read_logical(m, layout.rank_name(r, "x")), torch.full((1000,), float(r)))
        assert not [q for q in (tmp_path / "run" / "checkpoints").iterdir() if q.name.startswith(".")]
        last_committed = epoch
    assert trials >= 20, f"only {trials} trials in the time bound"
    assert last_committed > 0
    assert leftovers > 0, "no kill landed inside a save: the trials tested nothing"
