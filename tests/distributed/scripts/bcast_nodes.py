"""Two simulated nodes: run once per node with `torchrun --nnodes 2 --node_rank N ...`.

Only node 0 is told where the checkpoints are (GRAFT_TEST_CKPT_DIR in its environment);
node 1 passes no path at all. Writes OUT_DIR/rank{r}.json.

    bcast_nodes.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist
from bcast_common import Results, changed_model, expected_state, init_gloo, loaded_bitwise_equal, state_digest

import graft

rank, world = init_gloo()
res = Results(sys.argv[1], rank)
folder = os.environ.get("GRAFT_TEST_CKPT_DIR")
assert (folder is not None) == (rank == 0), "only node 0 may know where the checkpoint is"
expected = expected_state()


def where(name: str):
    return str(Path(folder) / name) if folder else None


def good():
    model = changed_model(rank)
    report = graft.load(model, where("vgg.safetensors"), freeze="loaded", bucket_mb=0.01, verbose=False)
    return {"differs_from_checkpoint": loaded_bitwise_equal(model, expected, report),
            "rnn3": state_digest(model, "rnn3."), "all": state_digest(model), "report": report.to_dict(),
            "node_rank": os.environ.get("GROUP_RANK")}


res.case("good", good)
res.case("corrupt_shard", lambda: graft.load(changed_model(rank), where("corrupt"), verbose=False))
res.case("after", good)
dist.destroy_process_group()
