"""`graft convert` on checkpoints written by the real tools, each output read back by the
target ecosystem's own reader, every tensor bitwise equal to what the writer held.

Sources (one launch each, shared by every test of the module): DeepSpeed ZeRO-3 with
frozen parameters (2 ranks), FSDP2 + `dcp.save` in torchtitan's top-level layout (2 ranks),
accelerate `save_state` (2 processes). Targets: safetensors (`safe_open`), hf (the index and
its shards, `safe_open`), torch (`torch.load(weights_only=True)`), dcp (`dcp.load`, one
process here, and into an FSDP2 model on 2 ranks in one more launch for every source).
The torch.save'd `.pth` with `module.` prefixes and the huggingface_hub-sharded index are
in tests/unit/test_convert.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from convert_checks import assert_bitwise, read_back
from launch import REPO, torchrun
from safetensors.torch import load_file

import graft

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]  # accelerate launch is a real launcher
SCRIPTS = REPO / "tests/distributed/scripts"
TARGETS = {"safetensors": "out.safetensors", "hf": "hf", "torch": "out.pth", "dcp": "dcp"}
SOURCES = ("zero3", "fsdp2_dcp", "accelerate")


@pytest.fixture
def sources(real_sources):
    return real_sources  # written once per session (tests/distributed/conftest.py)


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("name", SOURCES)
def test_real_checkpoint_to_target(sources, tmp_path, name, to):
    src, truth, _ = sources[name]
    dst = tmp_path / TARGETS[to]
    report = graft.convert(src, dst, to=to, progress=False, max_shard_size="100KB")
    assert report.bytes_written == sum(v.nbytes for v in truth.values())
    assert_bitwise(read_back(dst, to), truth)
    if to == "hf":
        assert len(report.files) > 1  # really sharded


def test_zero3_to_bf16_safetensors(sources, tmp_path):
    src, truth, _ = sources["zero3"]
    dst = tmp_path / "bf16.safetensors"
    report = graft.convert(src, dst, to="safetensors", dtype="bf16", progress=False)
    assert_bitwise(read_back(dst, "safetensors"), truth, dtype=torch.bfloat16)
    assert report.selection.casts == {"float32 -> bfloat16": sum(v.is_floating_point() for v in truth.values())}
    assert read_back(dst, "safetensors")["features.1.num_batches_tracked"].dtype == torch.int64


def test_dcp_outputs_load_into_fsdp2_on_two_ranks(sources, tmp_path):
    """Every source converted to DCP (one top-level, the others nested under `model`), then
    `dcp.load` into FSDP2 on 2 ranks: the full state gathered afterwards is the source's."""
    cases = []
    for i, name in enumerate(SOURCES):
        src, _, batch_norm = sources[name]
        key = None if i == 0 else "model"
        graft.convert(src, tmp_path / name, to="dcp", dcp_key=key, progress=False)
        cases.append({"dcp": str(tmp_path / name), "dcp_key": key, "batch_norm": batch_norm,
                      "out": str(tmp_path / f"{name}.loaded.safetensors")})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(cases))
    torchrun(SCRIPTS / "convert_dcp_load.py", spec, timeout=300)
    errors = [p.read_text() for p in tmp_path.glob("*.error")]
    assert not errors, errors[0]
    for name, case in zip(SOURCES, cases):
        assert_bitwise(load_file(case["out"]), sources[name][1])
