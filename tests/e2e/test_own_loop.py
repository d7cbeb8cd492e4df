"""A user's own loop (graft/templates/own_loop.py: accelerate, no graft Trainer) on graft.Checkpointer.

Launches (2 CPU processes, gloo), each the command `graft train --script examples/own_loop.py
--strategy S --device cpu` builds (graft.launch.commands: accelerate launch for ddp and zero2,
torchrun for fsdp), each checked against the straight run:

    straight     4 epochs in one launch
    halves       2 epochs, then a second launch resumes and finishes: every step's loss and the
                 final state bitwise the straight run's
    preempted    a real SIGTERM to rank 0 at step 3 (mid-epoch): both ranks save and exit; the
                 next launch resumes at that sample: bitwise the straight run again
    extended     the finished straight run resumed with 8 epochs (LambdaLR, policy stretch): the
                 learning rate of every added step is the stretched curve's, exactly
    zero2        DeepSpeed ZeRO-2 engine: 1 of 2 epochs, then resume and save the restored state
    fsdp2        the same under torchrun with fully_shard
"""

from __future__ import annotations

import json
import shutil

import pytest

from graft.templates.own_loop import lr_factor
from launch import REPO, child_env, graft_launch
from run_helpers import state_differences

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]
SCRIPT = REPO / "examples/own_loop.py"
PREEMPTED = REPO / "tests/e2e/scripts/own_loop_preempted.py"


def accelerate(script, *args, deepspeed: bool = False, env=None):
    """`script args` launched as `graft train --strategy ddp` (or zero2) launches it."""
    return graft_launch(script, *args, strategy="zero2" if deepspeed else "ddp", timeout=300,
                        env=env or child_env())


def fsdp(script, *args):
    """`script args` launched as `graft train --strategy fsdp` launches it on CPU (torchrun)."""
    return graft_launch(script, *args, strategy="fsdp", timeout=300)


def losses(run_dir) -> dict[int, dict]:
    """The last line logged for each step (a resumed launch logs the steps after the checkpoint)."""
    return {d["step"]: d for d in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())}


def last_checkpoint(run_dir):
    return sorted((run_dir / "checkpoints").iterdir())[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("own_loop")
    accelerate(SCRIPT, "--out", out / "straight", "--epochs", 4)
    accelerate(SCRIPT, "--out", out / "halves", "--epochs", 4, "--session-epochs", 2)
    accelerate(SCRIPT, "--out", out / "halves", "--epochs", 4)
    stopped = accelerate(PREEMPTED, "--out", out / "preempted", "--epochs", 4, env=child_env(STOP_AT="3"))
    (out / "preempted.first.txt").write_text(stopped.stdout)
    accelerate(SCRIPT, "--out", out / "preempted", "--epochs", 4)
    shutil.copytree(out / "straight", out / "extended")
    accelerate(SCRIPT, "--out", out / "extended", "--epochs", 8, "--policy", "stretch")
    accelerate(SCRIPT, "--out", out / "zero2", "--epochs", 2, "--session-epochs", 1, deepspeed=True)
    accelerate(SCRIPT, "--out", out / "zero2", "--epochs", 2, "--check-restore", out / "zero2_restored",
               deepspeed=True)
    fsdp(SCRIPT, "--out", out / "fsdp2", "--fsdp2", "--epochs", 2, "--session-epochs", 1)
    fsdp(SCRIPT, "--out", out / "fsdp2", "--fsdp2", "--epochs", 2, "--check-restore", out / "fsdp2_restored")
    return out


@pytest.mark.parametrize("name", ["halves", "preempted"])
def test_a_stopped_and_resumed_run_is_bitwise_the_straight_one(runs, name):
    straight, resumed = losses(runs / "straight"), losses(runs / name)
    assert sorted(straight) == sorted(resumed) == list(range(1, 25))  # 4 epochs of 6 steps
    assert resumed == straight  # every step's loss and learning rate, bit for bit
    assert last_checkpoint(runs / name).name == "epoch_000004"
    assert state_differences(last_checkpoint(runs / "straight"), last_checkpoint(runs / name)) == []


def test_sigterm_mid_epoch_saves_on_every_rank_and_the_next_launch_continues_there(runs):
    first = (runs / "preempted.first.txt").read_text()
    assert "preempted at step 3: saved" in first and "finished" not in first
    # The second launch logged from step 4 on: it resumed at the mid-epoch checkpoint (epoch 0,
    # step 3), which keep_last=3 has since rotated away.
    lines = (runs / "preempted" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, *range(4, 25)]


def test_extending_a_finished_run_follows_the_stretched_learning_rate(runs):
    before, after = losses(runs / "straight"), losses(runs / "extended")
    assert sorted(after) == list(range(1, 49)) and all(after[s] == before[s] for s in before)
    for s in range(25, 49):  # step s uses the LambdaLR factor of s - 1, on the new 48-step horizon
        assert after[s]["lr"] == 3e-3 * lr_factor(s - 1, 48), s
    assert after[25]["lr"] > before[24]["lr"]  # stretch: the cosine is only half way at step 24 of 48


@pytest.mark.parametrize("name", ["zero2", "fsdp2"])
def test_deepspeed_and_fsdp2_loops_restore_the_saved_state_exactly(runs, name):
    saved, restored = runs / name / "checkpoints" / "epoch_000001", last_checkpoint(runs / f"{name}_restored")
    assert restored.name == "epoch_000001"
    # Weights, every optimizer state tensor, param groups and the LambdaLR state, bitwise.
    assert state_differences(saved, restored) == []
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["strategy"] == {"zero2": "deepspeed", "fsdp2": "fsdp2"}[name] and manifest["world_size"] == 2
