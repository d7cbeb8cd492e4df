"""`accelerate launch --multi_gpu --num_processes 2 ...` with Accelerator(cpu=True) (DDP on gloo):

    wrap_accelerate.py CKPT OUT_DIR

The Accelerator comes first (it starts the process group), then graft.load on every
process, then prepare(). Rank 1 is given a path that does not exist.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from bcast_common import MISSING, Results, batches, changed_model, expected_state, frozen_check, optimizer_check

import graft

ckpt, out_dir = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
res = Results(out_dir, rank)
expected = expected_state()


def ddp():
    model = changed_model(rank)
    report = graft.load(model, ckpt if rank == 0 else MISSING, freeze="loaded", verbose=False)
    before = frozen_check(model.named_parameters(), expected)
    optimizer = torch.optim.AdamW(graft.trainable_parameters(model), lr=1e-2)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    for x, y in batches(rank):
        loss = F.cross_entropy(wrapped(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    after = frozen_check(wrapped.named_parameters(), expected)
    inner = accelerator.unwrap_model(wrapped)
    return {**after, "rnn3_before": before["rnn3"], "optimizer": optimizer_check(optimizer.optimizer, inner),
            "distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes,
            "wrapper": type(wrapped).__name__,
            "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
            "report_new": report.new}


res.case("accelerate_ddp", ddp)
res.data["done"] = True
res.write()
accelerator.end_training()
