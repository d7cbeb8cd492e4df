"""Resume and extension, single process: exact continuation, each extension policy, SIGTERM, kill -9.

The runs are tiny (tiny_vgg, 32x32 digits, 240 samples, 4 steps per epoch) and run in this
process, except the SIGTERM case (a real `python train.py`) and the kill -9 trials (forked
children killed while they save).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from graft.errors import CheckpointError
from graft.trainer import run
import launch
from launch import REPO
from run_helpers import events, state_differences, step_lines, tiny_config, tiny_overrides

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
    env = launch.child_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= 4:  # step 4 of 20 in epoch 1
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "preempted" in output
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


# -- kill -9 during saves ----------------------------------------------------------------

def _save_forever(run_dir: str, conn) -> None:
    """Child: commit checkpoints back to back (the real writer, rotation included), report each."""
    from graft.trainer import checkpoint as ck

    torch.set_num_threads(1)
    n = int(conn.recv())
    while True:
        n += 1
        atomic = ck.AtomicCheckpoint(run_dir, ck.checkpoint_name(n), is_main=True)
        tmp = atomic.begin()
        g = torch.Generator().manual_seed(n)
        ck.write_safetensors(tmp / ck.MODEL, {f"w{i}": torch.randn(256, 256, generator=g) for i in range(8)})
        ck.save_tree(tmp, "optimizer", {"state": {"w0": {"step": torch.tensor(float(n))}}, "param_groups": []})
        ck.write_json(tmp / ck.TRAIN_STATE, {"epoch": n})
        final = atomic.commit({"epoch": n, "step": n})
        ck.rotate(run_dir, 2, final)
        conn.send(n)


def test_kill_9_during_saves_never_loses_a_complete_checkpoint(tmp_path):
    from graft.trainer import checkpoint as ck

    ctx = multiprocessing.get_context("fork")
    rnd = random.Random(1234)
    run_dir = str(tmp_path)
    last_committed = 0
    trials, leftovers, started = 0, 0, time.time()
    while trials < 24 and time.time() - started < 90:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_save_forever, args=(run_dir, child), daemon=True)
        p.start()
        parent.send(last_committed)
        time.sleep(rnd.uniform(0.02, 0.5))
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        while parent.poll():
            last_committed = parent.recv()
        trials += 1
        # What resume-auto does: clean leftovers, pick the newest complete checkpoint.
        leftovers += bool(ck.clean_leftovers(run_dir))
        if last_committed == 0:
            continue
        folder, skipped = ck.find_resume(run_dir)
        epoch = json.loads((folder / "train_state.json").read_text())["epoch"]
        assert epoch >= last_committed, (trials, epoch, last_committed, skipped)
        from safetensors.torch import load_file

        w = load_file(str(folder / ck.MODEL))
        g = torch.Generator().manual_seed(epoch)
        assert torch.equal(w["w0"], torch.randn(256, 256, generator=g))
        assert not [q for q in (tmp_path / "checkpoints").iterdir() if q.name.startswith(".")]
        last_committed = epoch
    assert trials >= 20, f"only {trials} trials in the time bound"
    assert last_committed > 0
    assert leftovers > 0, "no kill landed inside a save: the trials tested nothing"
