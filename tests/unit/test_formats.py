"""The readers of issue 2: torch files, safetensors, Hugging Face sharded indexes."""

import json

import pytest
import torch
from conftest import Small
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

import graft


def test_torch_file_metadata_without_reading_tensors(tmp_path, trained_small):
    path = tmp_path / "m.pth"
    torch.save({"epoch": 7, "state_dict": trained_small.state_dict()}, path)
    ckpt = graft.open(path)
    assert ckpt.format == "torch" and ckpt.source == "state_dict"
    assert set(ckpt.keys()) == set(trained_small.state_dict())
    meta = ckpt.meta("conv.weight")
    assert meta.shape == (4, 3, 3, 3) and meta.dtype == torch.float32 and meta.nbytes == 4 * 27 * 4
    assert ckpt.bytes_read == 0
    assert torch.equal(ckpt.tensor("conv.weight"), trained_small.conv.weight)
    assert ckpt.bytes_read == meta.nbytes


@pytest.mark.parametrize("container", ["state_dict", "model_state_dict", "model", "module", "net"])
def test_usual_containers_are_found_and_named(tmp_path, trained_small, container):
    path = tmp_path / "m.pt"
    torch.save({container: trained_small.state_dict(), "step": 3, "optimizer": {"lr": 0.1}}, path)
    report = graft.load(Small(), path, verbose=False)
    assert report.source == container and len(report.loaded) == len(trained_small.state_dict())
    assert f"weights at '{container}'" in str(report)


def test_caller_names_the_container_and_ambiguity_is_explained(tmp_path, trained_small):
    other = Small().state_dict()
    path = tmp_path / "ema.ckpt"
    torch.save({"weights_a": trained_small.state_dict(), "weights_b": other}, path)
    with pytest.raises(graft.CheckpointError, match="container="):
        graft.open(path)
    m = Small()
    graft.load(m, path, container="weights_b", verbose=False)
    assert torch.equal(m.conv.weight, other["conv.weight"])
    path2 = tmp_path / "nested.pt"
    torch.save({"ema": {"model": trained_small.state_dict()}}, path2)
    assert graft.open(path2, container="ema.model").source == "ema.model"


def test_legacy_and_noncontiguous_torch_files(tmp_path, trained_small):
    state = dict(trained_small.state_dict())
    state["head.weight"] = state["head.weight"].t().contiguous().t()  # a non-contiguous view
    assert not state["head.weight"].is_contiguous()
    for legacy in (False, True):
        path = tmp_path / f"m{legacy}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        m = Small()
        graft.load(m, path, verbose=False)
        for k, v in state.items():
            assert torch.equal(m.state_dict()[k], v), (legacy, k)


def test_safetensors_file(tmp_path, trained_small):
    path = tmp_path / "m.safetensors"
    save_file(trained_small.state_dict(), path, metadata={"format": "pt"})
    ckpt = graft.open(path)
    assert ckpt.format == "safetensors" and ckpt.metadata == {"format": "pt"}
    m = Small(num_classes=3)
    report = graft.load(m, path, verbose=False)
    assert set(report.mismatched) == {"head.weight", "head.bias"}
    assert torch.equal(m.bn.running_var, trained_small.bn.running_var)
    assert report.bytes_read == sum(
        v.numel() * v.element_size() for k, v in trained_small.state_dict().items() if not k.startswith("head")
    )


@pytest.mark.parametrize("safe", [True, False])
def test_hf_sharded_index_opens_only_needed_shards(tmp_path, safe):
    torch.manual_seed(0)
    # Shards ordered so that `head.*` sits alone in the last shard.
    state = {f"layer{i}.weight": torch.randn(64, 64) for i in range(4)}
    state["head.weight"] = torch.randn(64, 64)
    save_torch_state_dict(state, tmp_path, max_shard_size="20KB", safe_serialization=safe)
    index = tmp_path / ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json")
    assert index.exists()
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) == 5

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer0 = torch.nn.Linear(64, 64, bias=False)
            self.layer1 = torch.nn.Linear(64, 64, bias=False)
            self.new = torch.nn.Linear(64, 64, bias=False)

    m = M()
    ckpt = graft.open(tmp_path)
    assert ckpt.format == "hf-index" and len(ckpt.keys()) == 5
    report = graft.load(m, ckpt, verbose=False)
    assert set(report.loaded) == {"layer0.weight", "layer1.weight"} and report.new == ["new.weight"]
    assert {p.rsplit("/", 1)[-1] for p in ckpt.shards_opened} == {weight_map["layer0.weight"], weight_map["layer1.weight"]}
    assert torch.equal(m.layer1.weight, state["layer1.weight"])
    assert report.bytes_read == 2 * 64 * 64 * 4
    assert graft.open(index).format == "hf-index"
