"""Crafted cases of issue 8 ("never a wrong value"): each defect the fuzzers found, pinned.

A safetensors header as strict as the reference reader, every checkpoint JSON through the
bounded parser, index shards kept inside their folder (the Hugging Face cache's symlinks
still read), low-level errors as CheckpointError, and a file that shrinks before the transfer
leaving the model as it was. The cases that need a child process (permission denied, as a user
who may not read the file; `graft` printing one `graft: error:` line with exit 2) are in
tests/e2e/test_os_faults.py and tests/e2e/test_console.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import Small, assert_unchanged, snapshot
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file

import graft
from graft.loading.formats import json_file

INDEX = "model.safetensors.index.json"


def parts(path: Path) -> tuple[int, bytes, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8 : 8 + n], data[8 + n :]


def rewrite(path: Path, header_text: str, body: bytes, n: int | None = None) -> None:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + body)


def refused(model, path, match: str) -> graft.CheckpointError:
    before = snapshot(model)
    with pytest.raises(graft.CheckpointError, match=match) as info:
        graft.load(model, path, verbose=False, progress=False)
    assert_unchanged(model, before)
    assert str(path.name) in str(info.value) and info.value.way_out
    return info.value


# -- the safetensors header ---------------------------------------------------------------

@pytest.mark.parametrize("delta", [-1, 1])
def test_header_length_off_by_one_is_refused(tmp_path, trained_small, delta):
    path = tmp_path / "m.safetensors"
    save_file(trained_small.state_dict(), path)
    n, header, body = parts(path)
    assert header.endswith(b" "), "save_file pads its header; -1 still parses, and every tensor would be 1 byte off"
    path.write_bytes(struct.pack("<Q", n + delta) + header + body)
    with pytest.raises(Exception):
        load_file(path)  # the reference refuses it too
    refused(Small(), path, "8 \\+ header \\+ data|not valid JSON")


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, path)
    _, header, body = parts(path)
    text = header.decode().rstrip()
    b_entry = json.dumps(json.loads(text)["b"], separators=(",", ":"))
    rewrite(path, text.replace("{", '{"a":' + b_entry + ",", 1), body)  # "a" twice: the last would win
    with pytest.raises(graft.CheckpointError, match="'a' appears twice"):
        graft.open(path)


def test_negative_dims_with_the_right_product_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2, 3)}, path)
    _, header, body = parts(path)
    rewrite(path, header.decode().replace("[2,3]", "[-2,-3]"), body)
    with pytest.raises(graft.CheckpointError, match="'w' has shape \\[-2, -3\\]"):
        graft.open(path)


@pytest.mark.parametrize("bad, match", [
    ("[" * 100_000, "nesting deeper"),
    ('{"a": ' + "9" * 5000 + "}", "number of 5000 characters"),
    ('{"a": Infinity}', "Infinity"),
    ('{"a": NaN}', "NaN"),
    ('{"a": 1E400}', "not finite"),
    ('{"a": 1, "a": 2}', "appears twice"),
    ('{"a\\ud800": 1}', "surrogate"),
    ("[1, 2]", "a JSON array, not object"),
    ('"x"', "a JSON string, not object"),
    ("null", "a JSON null, not object"),
])
def test_the_bounded_json_parser_refuses(bad, match):
    with pytest.raises(graft.CheckpointError, match=match) as info:
        json_file.parse(bad.encode(), "some.json", "the index")
    assert info.value.path == "some.json"


def test_the_bounded_json_parser_refuses_a_file_over_its_cap(tmp_path):
    path = tmp_path / "big.index.json"
    path.write_text('{"weight_map": {}}' + " " * 100)
    with pytest.raises(graft.CheckpointError, match="larger than 64 bytes"):
        json_file.read(path, "the index", max_bytes=64)


# -- index shards stay inside their folder ------------------------------------------------

def two_shards(folder: Path) -> dict[str, torch.Tensor]:
    state = {f"w{i}": torch.randn(16, 16) for i in range(3)}
    folder.mkdir()
    save_torch_state_dict(state, folder, max_shard_size="1KB")
    return state


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_entries_escaping_the_folder_are_refused(tmp_path, entry):
    folder = tmp_path / "ckpt"
    state = two_shards(folder)
    outside = tmp_path / "outside.safetensors"
    save_file({k: v + 1 for k, v in state.items()}, outside)  # what an escaping index would read
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["w1"] = entry
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(graft.CheckpointError, match="is not a file inside") as info:
        graft.open(folder)
    assert "'w1'" in str(info.value) and entry in str(info.value)


def test_hugging_face_cache_layout_with_symlinked_shards_loads(tmp_path):
    """snapshots/<rev>/* are symlinks to ../../blobs/<sha>, as huggingface_hub's cache keeps them."""
    written = tmp_path / "written"
    state = two_shards(written)
    repo = tmp_path / "models--org--net"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir = repo / "snapshots" / "0123abcd"
    snapshot_dir.mkdir(parents=True)
    for i, f in enumerate(sorted(written.iterdir())):
        blob = f"{i:040x}"
        shutil.copy(f, repo / "blobs" / blob)
        (snapshot_dir / f.name).symlink_to(f"../../blobs/{blob}")
    assert all(p.is_symlink() for p in snapshot_dir.iterdir())

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in state.items():
                self.register_parameter(k, torch.nn.Parameter(torch.zeros_like(v)))

    for path in (snapshot_dir, snapshot_dir / INDEX):
        m = M()
        report = graft.load(m, path, verbose=False, progress=False)
        assert sorted(report.loaded) == sorted(state)
        for k, v in state.items():
            assert torch.equal(getattr(m, k), v)


# -- a file that shrinks after it was opened ----------------------------------------------

def test_a_file_that_shrinks_before_the_transfer_leaves_the_model_unchanged(tmp_path, trained_small):
    path = tmp_path / "m.safetensors"
    save_file(trained_small.state_dict(), path)
    with graft.open(path) as ckpt:
        model = Small()
        assert len(graft.plan(model, ckpt).loaded) == len(trained_small.state_dict())
        os.truncate(path, path.stat().st_size - 4)  # another process cuts it after open and plan
        refused(model, path, "truncated")


def test_a_shard_that_shrinks_after_validation_fails_before_the_first_byte(tmp_path):
    folder = tmp_path / "ckpt"
    state = two_shards(folder)
    with graft.open(folder) as ckpt:
        keys = sorted(state)
        ckpt.validate(keys)
        victim = Path(ckpt.span(keys[-1]).file)
        os.truncate(victim, victim.stat().st_size - 4)
        outs = [(k, torch.full_like(state[k], 7.0)) for k in keys]
        with pytest.raises(graft.CheckpointError, match="truncated"):
            ckpt.read_into(outs)  # sizes are checked again right before the first byte moves
        assert all(bool((out == 7).all()) for _, out in outs)
