"""DDP and FSDP2 (`fully_shard` on a CPU mesh) after graft.load(freeze="loaded"), one launch:

    torchrun --nproc_per_node 2 wrap_torch.py CKPT OUT_DIR

Rank 1 is given a path that does not exist. Each case: load, wrap, 3 training steps on
different data per rank; then the frozen parameters against the checkpoint (bitwise), the
new block (changed, equal on every rank) and the optimizer's parameters and state.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from bcast_common import (
    MISSING,
    Results,
    batches,
    changed_model,
    expected_state,
    frozen_check,
    init_gloo,
    optimizer_check,
)

import graft

ckpt, out_dir = sys.argv[1], sys.argv[2]
rank, world = init_gloo()
res = Results(out_dir, rank)
expected = expected_state()
path = ckpt if rank == 0 else MISSING


def train(wrapped, model, optimizer):
    for x, y in batches(rank):
        loss = F.cross_entropy(wrapped(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def ddp():
    model = changed_model(rank)
    graft.load(model, path, freeze="loaded", verbose=False)
    before = frozen_check(model.named_parameters(), expected)
    wrapped = graft.wrap_ddp(model)
    optimizer = torch.optim.AdamW(graft.trainable_parameters(model), lr=1e-2)
    train(wrapped, model, optimizer)
    after = frozen_check(wrapped.named_parameters(), expected)
    return {**after, "rnn3_before": before["rnn3"], "optimizer": optimizer_check(optimizer, model),
            "find_unused_parameters": wrapped.find_unused_parameters,
            "frozen_grads": sum(p.grad is not None for p in model.parameters() if not p.requires_grad)}


def fsdp2():
    from torch.distributed.device_mesh import init_device_mesh

    model = changed_model(rank)
    graft.load(model, path, freeze="loaded", verbose=False)
    before = frozen_check(model.named_parameters(), expected)
    mesh = init_device_mesh("cpu", (world,))
    graft.wrap_fsdp2(model, mesh)
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    optimizer = torch.optim.AdamW(graft.trainable_parameters(model), lr=1e-2)
    train(model, model, optimizer)
    after = frozen_check(model.named_parameters(), expected)
    return {**after, "rnn3_before": before["rnn3"], "optimizer": optimizer_check(optimizer, model),
            "sharded_params": sharded, "n_params": len(list(model.parameters()))}


res.case("ddp", ddp)
res.case("fsdp2", fsdp2)
res.data["done"] = True
res.write()
dist.destroy_process_group()
