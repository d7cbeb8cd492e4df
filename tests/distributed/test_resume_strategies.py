"""Save + resume, 2 processes on CPU (gloo), under every strategy: the resumed run is bitwise the straight one.

One launch per strategy, the command `graft train --strategy S --device cpu` builds
(graft.launch.commands); inside it the script trains 4 epochs straight, then 2 + resume 2,
and reports (tests/distributed/scripts/train_resume_strategy.py):

    ddp      accelerate launch --multi_gpu --num_processes 2, ACCELERATE_USE_CPU=true (MULTI_CPU)
    zero2    accelerate launch --use_deepspeed, graft/launch/configs/deepspeed/zero2.json
    zero3    accelerate launch --use_deepspeed, graft/launch/configs/deepspeed/zero3.json
    fsdp2    torchrun --nproc_per_node 2, train.strategy=fsdp2 (fully_shard; accelerate's FSDP
             plugin does nothing on CPU)
"""

from __future__ import annotations

import json

import pytest

import graft
from graft.models import tiny_vgg
from launch import REPO, graft_launch, torchrun

pytestmark = pytest.mark.distributed
SCRIPT = REPO / "tests/distributed/scripts/train_resume_strategy.py"
# Each case launched as `graft train --strategy S --nproc 2 --device cpu` launches it.
STRATEGY = {"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "fsdp2": "fsdp"}


@pytest.mark.parametrize("case", ["ddp", "zero2", "zero3", "fsdp2"])
def test_two_process_resume_is_bitwise(case, tmp_path):
    extra = ["train.strategy=fsdp2"] if case == "fsdp2" else []  # what `graft train --strategy fsdp` adds
    graft_launch(SCRIPT, tmp_path, *extra, strategy=STRATEGY[case], timeout=400)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["strategy"] == {"ddp": "ddp", "zero2": "deepspeed", "zero3": "deepspeed", "fsdp2": "fsdp2"}[case]
    assert result["first_epochs"] == 2 and result["epochs_done"] == 4
    assert result["resumed_from"].endswith("epoch_000002")
    assert result["steps"] == list(range(1, 17))
    assert result["losses_equal"]
    for name, c in result["checkpoints"].items():
        assert c["equal"], (name, c["differ"])
        # One shard per rank, no gathered file; weights and optimizer state as logical tensors.
        assert {"shards/rank_00000.safetensors", "shards/rank_00001.safetensors"} <= set(c["files"])
        assert "model.safetensors" not in c["files"]
        assert any(t.startswith("model/") for t in c["tensors"])
        assert "optim/features.0.weight/exp_avg" in c["tensors"]  # ZeRO's partitions too, by parameter name
    # The sharded weights are the whole model, readable by graft.load like any checkpoint.
    model = tiny_vgg()
    report = graft.load(model, tmp_path / "resumed", verbose=False)
    assert not report.new and not report.mismatched and not report.unexpected


def test_signal_to_one_rank_stops_all_at_the_same_step_and_resumes_exactly(tmp_path):
    torchrun(REPO / "tests/distributed/scripts/train_preempt_rank.py", tmp_path, timeout=400)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["preempted"] and r["signal"] == "SIGUSR1" and r["stopped_at_step"] == 3
    assert r["saved"] == ["epoch_000000_step_000003"]
    assert r["resumed_from"].endswith("epoch_000000_step_000003") and r["finished"]
    assert r["state_equal"] and r["losses_equal"]
