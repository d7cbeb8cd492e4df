"""Folders written by a real `accelerate launch` run (2 CPU processes, gloo) with save_state
and save_model, read into a changed model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import launch
from checks import assert_changed_model_loads
from launch import REPO, graft_launch
from safetensors.torch import load_file

import graft
from graft.launch.cli import main as graft_cli

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]
SCRIPT = REPO / "tests/distributed/scripts/accelerate_save.py"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    graft_launch(SCRIPT, out, strategy="ddp", timeout=240)  # as `graft train` starts DDP
    return out




@pytest.mark.parametrize("folder", ["state", "state_bin"])
def test_save_state_picks_each_model(written, folder):
    final_a, final_b = load_file(written / "final_a.safetensors"), load_file(written / "final_b.safetensors")
    assert not torch.equal(final_a["features.0.weight"], final_b["features.0.weight"])
    weights = {"state": ("model.safetensors", "model_1.safetensors"),
               "state_bin": ("pytorch_model.bin", "pytorch_model_1.bin")}[folder]
    for index, final in ((0, final_a), (1, final_b)):
        with graft.open(written / folder, model_index=index) as ckpt:
            assert ckpt.format == "accelerate"
            info = ckpt.info()
            assert info["models"] == 2 and info["weights"] == weights[index] and info["world_size"] == 2
            assert info["written_by"] == "save_state"
        report = assert_changed_model_loads(written / folder, final, model_index=index)
        assert report.plan.source.startswith(weights[index])
    with pytest.raises(graft.CheckpointError, match="holds 2 model"):
        graft.open(written / folder, model_index=2)


def test_save_model_sharded_and_single(written):
    final_a, final_b = load_file(written / "final_a.safetensors"), load_file(written / "final_b.safetensors")
    # Shards + index are the Hugging Face layout: the HF index reader opens them.
    with graft.open(written / "model_sharded") as ckpt:
        assert ckpt.format == "hf-index" and ckpt.info()["shards"] > 1
    assert_changed_model_loads(written / "model_sharded", final_a)
    with graft.open(written / "model_single") as ckpt:
        info = ckpt.info()
        assert ckpt.format == "accelerate" and info["written_by"] == "save_model"
        assert info["weights"] == "model.safetensors" and info["models"] == 1
    assert_changed_model_loads(written / "model_single", final_b)


def test_inspect_shows_models_and_world_size(written, capsys):
    assert graft_cli(["inspect", str(written / "state")]) == 0
    out = capsys.readouterr().out
    assert "accelerate" in out and "models       2" in out and "world_size   2" in out


def test_loading_imports_no_accelerate_deepspeed_or_dcp():
    code = ("import sys, graft, graft.loading; "
            "bad = [m for m in ('accelerate', 'deepspeed', 'torch.distributed.checkpoint') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=launch.child_env(), cwd=REPO, timeout=120)
