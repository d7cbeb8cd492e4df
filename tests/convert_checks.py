"""Reading a converted checkpoint back with the TARGET ecosystem's own reader, and comparing bits.

Shared by tests/unit/test_convert.py, tests/distributed/test_convert_real.py and
tests/e2e/test_os_faults.py. Never graft's own readers: the point is that the other tools accept
what graft wrote.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

TARGETS = ("safetensors", "hf", "dcp", "torch")
# Where the one-process tests write each target (a file or a folder).
OUT_NAME = {"safetensors": "out.safetensors", "hf": "out_hf", "dcp": "out_dcp", "torch": "out.pth"}


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}, f.metadata()  # transformers refuses shards without it
        return {k: f.get_tensor(k) for k in f.keys()}


def _hf(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = _safetensors(folder / shard)
        assert all(index["weight_map"][k] == shard for k in tensors)
        out.update(tensors)
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in out.values())
    assert not [p for p in folder.iterdir() if not p.name.startswith("model")], list(folder.iterdir())
    return out


def _dcp(folder: Path, dcp_key: str | None) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = f"{dcp_key}." if dcp_key else ""
    assert all(k.startswith(prefix) for k in metadata)
    target = {k[len(prefix):]: torch.full(m.size, 7, dtype=m.properties.dtype) for k, m in metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load({dcp_key: target} if dcp_key else target, checkpoint_id=folder, no_dist=True)
    return target


def read_back(path: Path, to: str, dcp_key: str | None = None) -> dict[str, torch.Tensor]:
    if to == "safetensors":
        return _safetensors(path)
    if to == "hf":
        return _hf(path)
    if to == "torch":
        return torch.load(path, weights_only=True)
    if to == "dcp":
        return _dcp(path, dcp_key)
    raise ValueError(to)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """Same keys; every tensor equal to the source bit for bit, or to its cast where `dtype` applies."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(bits(got[key]), bits(value)), key
