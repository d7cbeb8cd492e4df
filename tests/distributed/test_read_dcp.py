"""DCP folders written by a real 2-process FSDP2 run (gloo, CPU), read into a changed model
in this plain process (no process group)."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from checks import assert_changed_model_loads, changed_model
from launch import REPO, torchrun
from safetensors.torch import load_file

import graft
from graft.launch.cli import main as graft_cli

pytestmark = pytest.mark.distributed
SCRIPT = REPO / "tests/distributed/scripts/dcp_fsdp2_save.py"
OPTIMIZER_GROUPS = ("optimizer.", "lr_scheduler.", "train_state.", "state.", "param_groups.")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    torchrun(SCRIPT, out, timeout=240)
    return out






def test_top_level_layout(written):
    final = load_file(written / "final.safetensors")
    with graft.open(written / "top") as ckpt:
        assert ckpt.format == "dcp" and ckpt.source is None
        assert sorted(ckpt.keys()) == sorted(final)  # optimizer, lr_scheduler, train_state left out
        info = ckpt.info()
        assert info["step"] == 1 and info["world_size"] == 2
        assert "optimizer" in info["not_model"] and "train_state" in info["not_model"]
        head = ckpt.meta("classifier.6.weight")
        assert head.shape == (5, 64) and head.dtype == torch.float32
    assert_changed_model_loads(written / "top", final)
    assert not torch.distributed.is_initialized()  # a plain process: no process group needed


def test_nested_layout(written):
    final = load_file(written / "final.safetensors")
    with graft.open(written / "nested") as ckpt:
        assert ckpt.format == "dcp" and ckpt.source == "model"
        assert sorted(ckpt.keys()) == sorted(final)
        assert not any(k.startswith(OPTIMIZER_GROUPS) for k in ckpt.keys())
        assert ckpt.info()["layout"] == "nested under 'model'"
    report = assert_changed_model_loads(written / "nested", final)
    assert report.plan.source == "model"
    # Naming the container gives the same keys.
    with graft.open(written / "nested", container="model") as ckpt:
        assert sorted(ckpt.keys()) == sorted(final)


def test_load_on_every_rank_of_a_process_group(written):
    """The writer run also called graft.load on both ranks (rank 0 reads, then broadcasts)."""
    errors = sorted(written.glob("rank*_load_error.txt"))
    assert not errors, errors[0].read_text()
    final = load_file(written / "final.safetensors")
    got = load_file(written / "rank1_loaded.safetensors")
    for key in final:
        if not key.startswith("classifier.6."):
            assert torch.equal(got[key], final[key]), key
    assert (written / "rank1_report.txt").read_text() == "rnn3.0.bias rnn3.0.weight"


def test_one_chunk_tensors_are_byte_spans(written):
    """A tensor stored whole in one record is read as a raw byte range of the .distcp file."""
    final = load_file(written / "final.safetensors")
    with graft.open(written / "single") as ckpt:
        spans = {k: ckpt.span(k) for k in ckpt.keys()}
        assert all(s is not None and s.nbytes == final[k].nbytes for k, s in spans.items())
        for key in ckpt.keys():
            assert torch.equal(ckpt.tensor(key), final[key]), key
    with graft.open(written / "top") as ckpt:  # FSDP: two row blocks, one per rank
        assert ckpt.span("features.0.weight") is None
    assert_changed_model_loads(written / "single", final)


def test_missing_distcp_file_leaves_model_untouched(written, tmp_path):
    broken = tmp_path / "nested"
    shutil.copytree(written / "nested", broken)
    (broken / "__1_0.distcp").unlink()
    model = changed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graft.CheckpointError) as e:
        graft.load(model, broken, freeze="loaded", verbose=False)
    assert "__1_0.distcp" in str(e.value) and "missing" in str(e.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    with graft.open(broken) as ckpt:
        assert ckpt.info()["missing_files"] == ["__1_0.distcp"]


def test_truncated_distcp_file_and_missing_metadata(written, tmp_path):
    broken = tmp_path / "top"
    shutil.copytree(written / "top", broken)
    data = (broken / "__0_0.distcp").read_bytes()
    (broken / "__0_0.distcp").write_bytes(data[:100])  # cuts into the first planned record
    model = changed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graft.CheckpointError, match="truncated"):
        graft.load(model, broken, verbose=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (broken / ".metadata").unlink()
    with pytest.raises(graft.CheckpointError, match=r"\.metadata"):
        graft.open(broken, format="dcp")


def test_metadata_is_unpickled_with_an_allowlist(written, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(written / "single", folder)

    class Payload:
        def __reduce__(self):
            return (print, ("code from the checkpoint ran",))

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(graft.CheckpointError, match="builtins.print"):
        graft.open(folder)


def test_inspect_shows_format_step_world_size(written, capsys):
    assert graft_cli(["inspect", str(written / "top")]) == 0
    out = capsys.readouterr().out
    assert "dcp" in out and "world_size   2" in out and "step         1" in out
