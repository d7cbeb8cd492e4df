"""Asynchronous save on 2 processes (CPU, gloo): under DDP (accelerate launch) and FSDP2 (torchrun,
train.strategy=fsdp2) every asynchronous checkpoint is bitwise the synchronous one of the same
step, and 2 epochs + resume 2 is bitwise the straight 4 (scripts/async_resume.py). A disk that
fills up under the background writers stops both ranks after the same step with the same one-line
StorageError, and the previous checkpoint stays complete (scripts/async_disk_full.py).
"""

from __future__ import annotations

import json

import pytest

from launch import REPO, graft_launch, torchrun
from e2e.test_faults import assert_all_complete, tmpfs

pytestmark = pytest.mark.distributed
SCRIPTS = REPO / "tests/distributed/scripts"


@pytest.mark.parametrize("case", ["ddp", "fsdp2"])
def test_async_checkpoints_equal_sync_and_resume_is_bitwise(case, tmp_path):
    script = SCRIPTS / "async_resume.py"
    # Launched as `graft train --strategy ddp|fsdp` launches them (fsdp on CPU: torchrun).
    if case == "fsdp2":
        graft_launch(script, tmp_path, "train.strategy=fsdp2", strategy="fsdp", timeout=500)
    else:
        graft_launch(script, tmp_path, strategy="ddp", timeout=500)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["world_size"] == 2 and r["strategy"] == case
    assert r["resumed_from"].endswith("epoch_000002") and r["epochs_done"] == 4
    assert r["async_vs_sync"] == {str(e): [] for e in (1, 2, 3, 4)}, r["async_vs_sync"]
    assert r["resumed_vs_straight"] == {str(e): [] for e in (2, 3, 4)}, r["resumed_vs_straight"]
    assert all(steps == list(range(1, 17)) for steps in r["steps"].values()), r["steps"]
    assert r["losses_equal"]
    assert r["background"] == [True] * 4


def test_disk_full_in_the_background_stops_every_rank_at_the_same_step(tmp_path):
    with tmpfs(tmp_path / "small", "20m") as mnt:
        out = mnt / "run"
        torchrun(SCRIPTS / "async_disk_full.py", out, timeout=300)
        reports = [json.loads((mnt / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert {r["type"] for r in reports} == {"StorageError"}, reports
        assert reports[0]["error"] == reports[1]["error"] and reports[0]["step"] == reports[1]["step"], reports
        line = reports[0]["error"]
        assert "\n" not in line and line.startswith(f"{out}: disk full while saving checkpoint epoch_000002"), line
        assert "epoch_000001 is intact, .tmp-epoch_000002 removed" in line, line
        assert reports[0]["step"] < 10_000  # raised while training went on, not at the end
        assert assert_all_complete(out) == ["epoch_000001"]
