"""Bad input: a clear CheckpointError naming the file, the problem and the way out; the model untouched."""

import collections
import json
import struct

import pytest
import torch
from conftest import Small, assert_unchanged, snapshot
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

import graft


def expect_error(model, path, match, **kwargs):
    before = snapshot(model)
    with pytest.raises(graft.CheckpointError, match=match) as info:
        graft.load(model, path, verbose=False, **kwargs)
    assert_unchanged(model, before)
    assert "way out" in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    err = expect_error(Small(), tmp_path / "nope.pth", "no such file")
    assert "nope.pth" in str(err)


def test_unknown_format_lists_what_was_looked_for(tmp_path):
    path = tmp_path / "weights.xyz"
    path.write_bytes(b"hello world, not a checkpoint")
    err = expect_error(Small(), path, "no checkpoint format")
    for fmt in ("torch", "safetensors", "hf-index"):
        assert fmt in str(err)


def test_zero_byte_files(tmp_path):
    for name in ("empty.pth", "empty.safetensors"):
        (tmp_path / name).write_bytes(b"")
        expect_error(Small(), tmp_path / name, "empty|too short")


def test_truncated_torch_file(tmp_path, trained_small):
    path = tmp_path / "m.pth"
    torch.save(trained_small.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(Small(), path, "corrupt or truncated")


def test_truncated_safetensors(tmp_path, trained_small):
    path = tmp_path / "m.safetensors"
    save_file(trained_small.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    err = expect_error(Small(), path, "truncated")
    assert "m.safetensors" in str(err)


def test_safetensors_header_that_lies_about_offsets(tmp_path, trained_small):
    path = tmp_path / "m.safetensors"
    save_file(trained_small.state_dict(), path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    begin, end = header["conv.weight"]["data_offsets"]
    header["conv.weight"]["data_offsets"] = [begin, end + 8]  # claims more bytes than its shape holds
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n :])
    expect_error(Small(), path, "lies about 'conv.weight'")


def test_overlapping_safetensors_entries(tmp_path, trained_small):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["b"]["data_offsets"] = header["a"]["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    path.write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(graft.CheckpointError, match="overlap"):
        graft.open(path)


def test_index_naming_a_missing_shard(tmp_path):
    state = {f"w{i}": torch.randn(64, 64) for i in range(3)}
    save_torch_state_dict(state, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["w1"]
    (tmp_path / victim).unlink()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w0 = torch.nn.Parameter(torch.zeros(64, 64))
            self.w1 = torch.nn.Parameter(torch.zeros(64, 64))

    err = expect_error(M(), tmp_path, victim)
    assert "model.safetensors.index.json" in str(err)


def test_truncated_shard_fails_before_any_tensor_is_copied(tmp_path):
    state = {f"w{i}": torch.randn(64, 64) for i in range(3)}
    save_torch_state_dict(state, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    last = tmp_path / index["weight_map"]["w2"]
    last.write_bytes(last.read_bytes()[:-100])

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(3):
                setattr(self, f"w{i}", torch.nn.Parameter(torch.zeros(64, 64)))

    expect_error(M(), tmp_path, "truncated")


class Config:  # a global that weights_only=True refuses
    def __init__(self):
        self.lr = 0.1


def test_pickle_with_a_forbidden_global_never_falls_back(tmp_path, trained_small):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": trained_small.state_dict(), "hparams": Config()}, path)
    err = expect_error(Small(), path, "test_bad_input.Config")
    assert "allow_globals" in str(err) and "never retries" in str(err)
    # The documented ways out: an inert stand-in for the named global ...
    m = Small()
    report = graft.load(m, path, allow_globals=["test_bad_input.Config"], verbose=False)
    assert len(report.loaded) == len(trained_small.state_dict())
    assert torch.equal(m.conv.weight, trained_small.conv.weight)
    # ... or, for a file one trusts, explicit unsafe unpickling.
    m = Small()
    graft.load(m, path, trust_pickle=True, verbose=False)
    assert torch.equal(m.head.weight, trained_small.head.weight)


def test_whole_module_pickles_are_refused_with_the_way_out(tmp_path, trained_small):
    path = tmp_path / "module.pth"
    torch.save(collections.OrderedDict(model=trained_small), path)
    expect_error(Small(), path, "global")


def test_unknown_container_named_by_caller(tmp_path, trained_small):
    path = tmp_path / "m.pth"
    torch.save({"state_dict": trained_small.state_dict()}, path)
    err = expect_error(Small(), path, "container 'ema' not found", container="ema")
    assert "state_dict" in str(err)
