"""The distributed load on real gloo process groups (2 processes, CPU), started by torchrun.

All single-node cases run in ONE launch (bcast_cases.py) and are judged here one by one;
the two-node case is a second launch pair. Rank 1 is never given a path that exists.
Every launch has a hard timeout: a rank that hangs fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import launch
from launch import free_port, torchrun

pytestmark = pytest.mark.distributed
SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from bcast_common import write_checkpoints  # noqa: E402

# A failure on rank 0 must reach every rank quickly; far below any launch timeout.
ERROR_SECONDS = 30


def _read(out: Path, world: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    return write_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def cases(ckpts, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("bcast_out")
    torchrun(SCRIPTS / "bcast_cases.py", ckpts, out, timeout=240)
    ranks = _read(out)
    assert all("done" in r for r in ranks), "a rank did not finish every case"
    return ranks


def _value(cases, name):
    for r, data in enumerate(cases):
        case = data[name]
        assert case["ok"], f"rank {r}, case {name}: {case.get('type')}: {case.get('message')}"
    return [data[name]["value"] for data in cases]


LOADS = ["small_buckets", "one_bucket", "torch_prefixed", "hf_index", "meta", "after_failure", "every_rank"]


@pytest.mark.parametrize("name", LOADS)
def test_loaded_tensors_equal_the_checkpoint_bitwise_on_every_rank(cases, name):
    values = _value(cases, name)
    for r, v in enumerate(values):
        assert v["differs_from_checkpoint"] == [], f"rank {r}"
        assert len(v["report"]["loaded"]) >= 22


@pytest.mark.parametrize("name", LOADS)
def test_every_rank_ends_identical_new_block_included(cases, name):
    values = _value(cases, name)
    # Each rank seeded rnn3 differently: only rank 0's values, sent, can make them equal.
    assert len({v["rnn3"] for v in values}) == 1
    assert len({v["all"] for v in values}) == 1


@pytest.mark.parametrize("name", LOADS)
def test_every_rank_returns_the_same_report(cases, name):
    values = _value(cases, name)
    assert values[0]["report"] == values[1]["report"]
    report = values[0]["report"]
    assert report["new"] == ["rnn3.0.weight", "rnn3.0.bias"]
    assert report["bytes_read"] >= report["bytes_to_read"] > 0


def test_freeze_loaded_leaves_only_the_new_block_trainable(cases):
    for v in _value(cases, "small_buckets"):
        assert v["trainable"] == ["rnn3.0.weight", "rnn3.0.bias"]
        assert len(v["frozen"]) == 22


def test_wrapper_prefix_rule_is_reported_on_every_rank(cases):
    values = _value(cases, "torch_prefixed")
    for v in values:
        assert v["report"]["source"] == "state_dict"
        assert any("module." in rule for rule in v["report"]["rules"])


def test_meta_model_is_materialised_from_the_stream(cases):
    values = _value(cases, "meta")
    for v in values:
        assert v["devices"] == ["cpu"]
        assert v["tied_is_same"], "materialising must keep tied parameters tied"
        # The non-persistent buffer: rank 0's value (2.0) on every rank, rank 1's was 3.0.
        assert v["scale"] == [2.0] * 5


def test_cast_and_overlap_copy_end_identical(cases):
    values = _value(cases, "cast_and_overlap")
    for v in values:
        assert v["loaded_equal"] and v["overlap_ok"]
        assert v["partial"] == ["classifier.6.weight", "classifier.6.bias"]
    assert values[0]["head"] == values[1]["head"]
    assert values[0]["all"] == values[1]["all"]


@pytest.mark.parametrize("name, error, words", [
    ("missing", "CheckpointError", "no such file"),
    ("unsafe", "CheckpointError", "fractions.Fraction"),
    ("corrupt_shard", "CheckpointError", "truncated"),
    ("read_fails", "CheckpointError", "I/O error"),
    ("every_rank_missing", "CheckpointError", "/nonexistent/rank1"),
    ("differs", "PlanError", "rank 1: classifier.6.weight"),
    ("args_differ", "GraftError", "bucket_mb"),
])
def test_a_failure_raises_the_same_error_on_every_rank_quickly(cases, name, error, words):
    outcomes = [data[name] for data in cases]
    for r, o in enumerate(outcomes):
        assert not o["ok"], f"rank {r} did not fail"
        assert o["type"] == error, f"rank {r}: {o['type']}: {o['message']}"
        assert "GraftError" in o["mro"]
        assert words in o["message"]
        assert o["seconds"] < ERROR_SECONDS
    assert outcomes[0]["message"] == outcomes[1]["message"]


def test_opting_out_loads_each_process_alone(cases):
    values = _value(cases, "not_distributed")
    for v in values:
        assert v["differs_from_checkpoint"] == []
    # No broadcast: the new block keeps each rank's own (differently seeded) values.
    assert values[0]["rnn3"] != values[1]["rnn3"]


def test_two_nodes_checkpoint_known_only_to_node_0(ckpts, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        env = launch.child_env(**({"GRAFT_TEST_CKPT_DIR": str(ckpts)} if node == 0 else {}))
        env.pop("GRAFT_TEST_CKPT_DIR", None) if node == 1 else None
        # Each node's line as the builder makes it (commands.torchrun_argv): one process per node.
        cmd = launch.torchrun_command(SCRIPTS / "bcast_nodes.py", tmp_path, nproc=1, nodes=2, node_rank=node,
                                      main_address="127.0.0.1", main_port=port, cwd=tmp_path)
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + 180
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("two-node run hung (a rank never returned)")
    for node, p in enumerate(procs):
        assert p.returncode == 0, f"node {node}:\n{outputs[node]}"
    ranks = _read(tmp_path)
    good = [r["good"]["value"] for r in ranks]
    assert [g["differs_from_checkpoint"] for g in good] == [[], []]
    assert good[0]["all"] == good[1]["all"] and good[0]["report"] == good[1]["report"]
    assert [g["node_rank"] for g in good] == ["0", "1"]
    for r in ranks:
        bad = r["corrupt_shard"]
        assert not bad["ok"] and bad["type"] == "CheckpointError" and "truncated" in bad["message"]
        assert bad["seconds"] < ERROR_SECONDS
        assert r["after"]["ok"]


# -- no process group needed ------------------------------------------------------------


def test_stream_messages_cover_every_byte_once_and_split_large_tensors():
    from graft.loading.distributed.wire import Item as _Item, messages as _messages

    items = [_Item("a", "ckpt", 100), _Item("b", "ckpt", 5000), _Item("c", "rank0", 3), _Item("d", "ckpt", 200)]
    msgs = _messages(items, capacity=1024)
    assert all(m.nbytes <= 1024 for m in msgs)
    for it in items:
        pieces = sorted((p.item_off, p.nbytes) for m in msgs for p in m.pieces if p.item is it)
        assert sum(n for _, n in pieces) == it.nbytes
        assert all(off == sum(n for _, n in pieces[:i]) for i, (off, _) in enumerate(pieces))
    direct = [m for m in msgs if m.direct]
    assert [m.pieces[0].item.name for m in direct] == ["b"] * 5  # large: its own chunks, no bucket
    packed = [p for m in msgs if not m.direct for p in m.pieces]
    assert {p.item.name for p in packed} == {"a", "c", "d"}
    assert all(p.msg_off % 64 == 0 for p in packed)


def test_materialize_meta_keeps_ties_and_requires_grad():
    from graft.loading.distributed import materialize_meta

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight
    model[0].bias.requires_grad_(False)
    names = materialize_meta(model)
    assert "0.weight" in names and "1.weight" in names
    assert model[0].weight is model[1].weight and model[0].weight.device.type == "cpu"
    assert not model[0].bias.requires_grad and model[1].bias.requires_grad


def test_single_process_ignores_the_distributed_path(ckpts):
    import graft
    from bcast_common import changed_model

    report = graft.load(changed_model(0), ckpts / "vgg.safetensors", verbose=False)
    assert report.new == ["rnn3.0.weight", "rnn3.0.bias"]
    with pytest.raises(ValueError, match="not initialised"):
        graft.load(changed_model(0), ckpts / "vgg.safetensors", distributed=True, verbose=False)
