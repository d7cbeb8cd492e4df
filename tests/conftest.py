import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# Tests import the helpers in tests/ (launch.py) and the repo's package without an install.
sys.path.insert(0, str(TESTS))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The tiers, by folder. tests/unit starts no process (fast, one process: `-m "not distributed"`);
# every test that starts processes (launchers, torchrun, forked ranks, a real train.py, console
# scripts, a child as another user) lives in tests/distributed or tests/e2e and is marked here.
TIERS = {"distributed": ("distributed",), "e2e": ("e2e", "distributed")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            folder = Path(item.path).resolve().relative_to(TESTS.resolve()).parts[0]
        except ValueError:
            continue
        for marker in TIERS.get(folder, ()):
            item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(scope="session")
def real_sources(tmp_path_factory) -> dict:
    """name -> (checkpoint, the weights the writer held, whether the model has BatchNorm):
    DeepSpeed ZeRO-3 with frozen parameters (2 ranks), FSDP2 + dcp.save in torchtitan's
    top-level layout (2 ranks), accelerate save_state (2 processes, as `graft train` starts DDP).
    Written once per session and shared by every module that reads them (graft convert,
    graft.open from s3://)."""
    import torch
    from launch import REPO, graft_launch, torchrun
    from safetensors.torch import load_file

    scripts = REPO / "tests/distributed/scripts"
    ds = tmp_path_factory.mktemp("zero3")
    torchrun(scripts / "deepspeed_write.py", ds, 3, timeout=600)
    fsdp = tmp_path_factory.mktemp("fsdp2")
    torchrun(scripts / "dcp_fsdp2_save.py", fsdp, timeout=300)
    acc = tmp_path_factory.mktemp("accelerate")
    graft_launch(scripts / "accelerate_save.py", acc, strategy="ddp", timeout=300)
    zero3_truth = torch.load(ds / "stage3/expected.pt", weights_only=True)
    assert zero3_truth["frozen"]  # frozen parameters are part of what must come through
    return {
        "zero3": (ds / "stage3", zero3_truth["state_dict"], True),
        "fsdp2_dcp": (fsdp / "top", load_file(fsdp / "final.safetensors"), False),
        "accelerate": (acc / "state", load_file(acc / "final_a.safetensors"), False),
    }
