"""The sharded save, measured on 2 processes (torchrun, gloo) with a model of 160 MB of fp32
weights plus AdamW state (about 500 MB to save): every rank writes its share (within 10% of
total / N, under DDP where everything is replicated and under FSDP2 where everything is
sharded), and no rank's memory grows by more than a few MB during the save (peak RSS reset
before the save and read after, and RssAnon sampled every 2 ms): nothing is gathered, nothing
copied. The bound the writer promises is its staging buffer for device tensors
(`shard_writer.STAGING_BYTES`, 64 MiB), never allocated for CPU tensors.
"""

from __future__ import annotations

import json

import pytest

from launch import REPO, torchrun

pytestmark = pytest.mark.distributed
SCRIPT = REPO / "tests/distributed/scripts/save_memory.py"
MiB = 1 << 20


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_each_rank_writes_its_share_and_holds_no_gathered_copy(mode, tmp_path):
    torchrun(SCRIPT, tmp_path, mode, nproc=2, timeout=400)
    r = json.loads((tmp_path / f"{mode}.json").read_text())
    total = sum(r["bytes_per_rank"])
    assert total >= r["logical_bytes"] > 450e6  # every logical byte once, plus headers and JSON
    for b in r["bytes_per_rank"]:
        assert abs(b - total / 2) <= 0.1 * total / 2, r["bytes_per_rank"]
    for rank in r["ranks"]:
        assert rank["samples"] > 10
        # A gathered copy would be +500 MB on rank 0 (DDP) or +250 MB (FSDP2); a clone of this
        # rank's state as much again. Measured here: about 1 MB.
        assert rank["hwm_growth"] < 16 * MiB and rank["anon_growth"] < 16 * MiB, rank
        assert rank["hwm_growth"] < 0.05 * rank["held_bytes"], rank
    assert r["staging_bytes"] == 64 * MiB
