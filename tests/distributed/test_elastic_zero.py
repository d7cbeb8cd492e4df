"""Elastic resume under DeepSpeed ZeRO: the engine's flat partitions saved as logical tensors
and restored at another world size, stage or strategy (graft/checkpointing/zero.py).

Five launches share the work (the steps of tests/distributed/scripts/elastic.py):

    accelerate launch --use_deepspeed zero3, 2 processes   train `zero3_2`
    accelerate launch --use_deepspeed zero2, 2 processes   train `zero2_2`
    python (1 process)                                     train `single`; check zero3_2 -> one process
    accelerate launch --use_deepspeed zero1, 2 processes   check single -> ZeRO-1 at 2
    accelerate launch --use_deepspeed zero3, 3 processes   check zero2_2 -> ZeRO-3 at 3

A check resumes a copy of the run, saves the restored state at once and compares every logical
tensor (weights, every optimizer state tensor), the param groups and the schedule with the saved
checkpoint, bitwise; then trains two more epochs, whose losses must keep falling.
"""

from __future__ import annotations

import json
import sys

import pytest

from graft.checkpointing import layout
from launch import REPO, child_env, graft_launch, run
from run_helpers import assert_elastic_check, elastic_plan

pytestmark = pytest.mark.distributed
SCRIPT = REPO / "tests/distributed/scripts/elastic.py"
# Part of the model frozen in every run: frozen parameters are the module's own tensors (whole at
# stages 1/2, partitioned at 3), trained ones live in the flat partitions; both must carry over.
FROZEN = ["init.freeze=[features.3.weight,features.3.bias,features.6.weight,features.6.bias]"]
PAIRS = {  # check name: (source run, world size, strategy it resumes under)
    "zero3_2_to_single": ("zero3_2", 1, "single"),
    "single_to_zero1_2": ("single", 2, "deepspeed"),
    "zero2_2_to_zero3_3": ("zero2_2", 3, "deepspeed"),
}


def _deepspeed(stage: int, nproc: int, out, plan: str) -> None:
    """As `graft train --strategy zeroN --nproc N` launches it (accelerate, graft's zeroN.json)."""
    graft_launch(SCRIPT, out, plan, strategy=f"zero{stage}", nproc=nproc, timeout=600, env=child_env())


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic_zero")
    _deepspeed(3, 2, out, elastic_plan(["train", "zero3_2", FROZEN]))
    _deepspeed(2, 2, out, elastic_plan(["train", "zero2_2", FROZEN]))
    run([sys.executable, str(SCRIPT), str(out),
         elastic_plan(["train", "single", FROZEN], ["check", "zero3_2", "zero3_2_to_single", FROZEN])],
        timeout=300, env=child_env())
    _deepspeed(1, 2, out, elastic_plan(["check", "single", "single_to_zero1_2", FROZEN]))
    _deepspeed(3, 3, out, elastic_plan(["check", "zero2_2", "zero2_2_to_zero3_3", FROZEN]))
    return out


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_restored_state_is_bitwise_the_saved_one_and_training_goes_on(elastic, pair):
    _, world, strategy = PAIRS[pair]
    assert_elastic_check(json.loads((elastic / f"{pair}.json").read_text()), world, strategy)


@pytest.mark.parametrize("run_name", ["zero3_2", "zero2_2"])
def test_zero_checkpoints_are_logical_tensors_written_evenly_by_every_rank(elastic, run_name):
    folder = sorted((elastic / run_name / layout.CHECKPOINTS).iterdir())[-1]
    manifest = json.loads((folder / layout.MANIFEST).read_text())
    # The same names as a DDP or FSDP2 checkpoint: weights and AdamW state by parameter name.
    assert "optim/features.0.weight/exp_avg" in manifest["tensors"]
    assert "model/features.3.weight" in manifest["tensors"]  # frozen: weights, no optimizer state
    assert not any(name.startswith("optim/features.3.") for name in manifest["tensors"])
    assert not any("/engine/" in name for name in manifest["tensors"])
    sizes = [manifest["files"][layout.shard_file(r)]["size"] for r in range(2)]
    assert max(sizes) <= 1.1 * sum(sizes) / 2, sizes
