"""Load, freeze, wrap, train 3 steps, under each wrapper, on real gloo process groups (2 processes).

One launch per launcher: torchrun (DDP, then FSDP2 fully_shard on a CPU mesh), the
deepspeed launcher (ZeRO 1, 2, 3), accelerate launch (DDP through Accelerator(cpu=True)).
Rank 1 is always given a checkpoint path that does not exist. After training, on every
rank: the frozen parameters are bitwise the checkpoint's, the new block changed and is
the same everywhere, and the optimizer holds and keeps state for trainable parameters only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launch import BIN, free_port, graft_launch, run, torchrun

pytestmark = pytest.mark.distributed
SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from bcast_common import write_checkpoints  # noqa: E402

N_FROZEN = 22  # every parameter of tiny_vgg; rnn3.0.weight and rnn3.0.bias train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoints(tmp_path_factory.mktemp("ckpts")) / "vgg.safetensors"


def _results(out: Path) -> list[dict]:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r.get("done") for r in ranks), "a rank did not finish"
    return ranks


@pytest.fixture(scope="module")
def torch_wrappers(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("wrap_torch")
    torchrun(SCRIPTS / "wrap_torch.py", ckpt, out, timeout=240)
    return _results(out)


@pytest.fixture(scope="module")
def deepspeed_zero(ckpt, tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("wrap_deepspeed")
    # DeepSpeed's own launcher, which users start scripts with; `graft train` never builds this line
    # (its ZeRO launches are accelerate's, as in accelerate_ddp below and the trainer's tests).
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
         str(SCRIPTS / "wrap_deepspeed.py"), str(ckpt), str(out)], timeout=360)
    return _results(out)


@pytest.fixture(scope="module")
def accelerate_ddp(ckpt, tmp_path_factory):
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("wrap_accelerate")
    graft_launch(SCRIPTS / "wrap_accelerate.py", ckpt, out, strategy="ddp", timeout=240)  # as `graft train` does
    return _results(out)


CASES = [("torch_wrappers", "ddp"), ("torch_wrappers", "fsdp2"), ("deepspeed_zero", "zero1"),
         ("deepspeed_zero", "zero2"), ("deepspeed_zero", "zero3"), ("accelerate_ddp", "accelerate_ddp")]


def _values(request, launch: str, case: str) -> list[dict]:
    ranks = request.getfixturevalue(launch)
    out = []
    for r, data in enumerate(ranks):
        c = data[case]
        assert c["ok"], f"rank {r}: {c.get('type')}: {c.get('message')}"
        out.append(c["value"])
    return out


@pytest.mark.parametrize("launch, case", CASES, ids=[c for _, c in CASES])
def test_frozen_parameters_stay_the_checkpoints_bitwise(request, launch, case):
    for r, v in enumerate(_values(request, launch, case)):
        assert len(v["frozen"]) == N_FROZEN, f"rank {r}"
        assert v["frozen_differs"] == [], f"rank {r}"


@pytest.mark.parametrize("launch, case", CASES, ids=[c for _, c in CASES])
def test_new_block_trains_and_stays_identical_across_ranks(request, launch, case):
    values = _values(request, launch, case)
    assert len({v["rnn3_before"] for v in values}) == 1
    assert len({v["rnn3"] for v in values}) == 1
    assert values[0]["rnn3"] != values[0]["rnn3_before"]


@pytest.mark.parametrize("launch, case", [c for c in CASES if not c[1].startswith("zero")],
                         ids=[c for _, c in CASES if not c.startswith("zero")])
def test_torch_optimizer_holds_only_trainable_parameters(request, launch, case):
    for v in _values(request, launch, case):
        opt = v["optimizer"]
        assert opt["groups_are_trainable"] and opt["state_is_trainable"]
        assert opt["frozen_in_optimizer"] == 0 and opt["n_trainable"] == 2
        if "find_unused_parameters" in v:
            assert v["find_unused_parameters"] is False


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_optimizer_state_covers_only_trainable_parameters(deepspeed_zero, stage):
    for data in deepspeed_zero:
        v = data[f"zero{stage}"]["value"]
        assert v["zero_stage"] == stage
        assert v["optimizer_params_trainable"]
        # Adam moments over all ranks: the trainable numel plus ZeRO's alignment padding,
        # nothing for the ~43k frozen weights.
        assert v["trainable_numel"] <= v["moments_numel_all_ranks"] < v["trainable_numel"] + 64
        assert v["frozen_numel"] > 100 * v["trainable_numel"]


def test_fsdp2_shards_frozen_and_trainable_parameters_together(torch_wrappers):
    for data in torch_wrappers:
        v = data["fsdp2"]["value"]
        assert v["sharded_params"] == v["n_params"] == N_FROZEN + 2


def test_accelerate_gives_ddp_on_gloo(accelerate_ddp):
    for data in accelerate_ddp:
        v = data["accelerate_ddp"]["value"]
        assert v["distributed_type"].endswith("MULTI_CPU") and v["num_processes"] == 2
        assert v["wrapper"] == "DistributedDataParallel"
        assert v["report_new"] == ["rnn3.0.weight", "rnn3.0.bias"]


def test_helpers_refuse_a_model_with_nothing_to_train():
    import graft
    from graft.models import tiny_vgg

    model = tiny_vgg()
    graft.freeze(model, ["*"])
    with pytest.raises(ValueError, match="no trainable parameter"):
        graft.deepspeed_params(model)
    with pytest.raises(ValueError, match="process group"):
        graft.wrap_ddp(tiny_vgg())
