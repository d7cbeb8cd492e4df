"""Checkpoints written by the real tools, launched once per test session and shared by every
module that reads them (graft convert, graft.open from s3://)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import REPO, graft_launch, torchrun
from safetensors.torch import load_file

SCRIPTS = REPO / "tests/distributed/scripts"


@pytest.fixture(scope="session")
def real_sources(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor], bool]]:
    """name -> (checkpoint, the weights the writer held, whether the model has BatchNorm):
    DeepSpeed ZeRO-3 with frozen parameters (2 ranks), FSDP2 + dcp.save in torchtitan's
    top-level layout (2 ranks), accelerate save_state (2 processes, as `graft train` starts DDP)."""
    ds = tmp_path_factory.mktemp("zero3")
    torchrun(SCRIPTS / "deepspeed_write.py", ds, 3, timeout=600)
    fsdp = tmp_path_factory.mktemp("fsdp2")
    torchrun(SCRIPTS / "dcp_fsdp2_save.py", fsdp, timeout=300)
    acc = tmp_path_factory.mktemp("accelerate")
    graft_launch(SCRIPTS / "accelerate_save.py", acc, strategy="ddp", timeout=300)
    zero3_truth = torch.load(ds / "stage3/expected.pt", weights_only=True)
    assert zero3_truth["frozen"]  # frozen parameters are part of what must come through
    return {
        "zero3": (ds / "stage3", zero3_truth["state_dict"], True),
        "fsdp2_dcp": (fsdp / "top", load_file(fsdp / "final.safetensors"), False),
        "accelerate": (acc / "state", load_file(acc / "final_a.safetensors"), False),
    }
