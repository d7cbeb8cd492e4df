"""DeepSpeed ZeRO stages 1, 2 and 3 after graft.load(freeze="loaded"), one launch:

    deepspeed --num_gpus 2 wrap_deepspeed.py CKPT OUT_DIR      (or torchrun)

torch.optim.AdamW over graft.deepspeed_params(model) with zero_allow_untested_optimizer
(no JIT-built DeepSpeed optimizer). Rank 1 is given a path that does not exist.
"""

from __future__ import annotations

import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from bcast_common import MISSING, Results, batches, changed_model, expected_state, frozen_check

import graft

# The deepspeed launcher adds --local_rank=N in front of the script's own arguments.
ckpt, out_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
res = Results(out_dir, rank)
expected = expected_state()
path = ckpt if rank == 0 else MISSING


def config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}


def zero(stage: int):
    def run():
        model = changed_model(rank)
        graft.load(model, path, freeze="loaded", verbose=False)
        before = frozen_check(model.named_parameters(), expected)
        params = graft.deepspeed_params(model)
        trainable_numel = sum(p.numel() for p in params)
        frozen_numel = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=config(stage))
        for x, y in batches(rank):
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
        all_params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(all_params, enabled=stage == 3):
            after = frozen_check(engine.module.named_parameters(), expected)
        # What ZeRO keeps for the optimizer: its fp16/bit16 groups (parameters) and the
        # Adam moments of its fp32 partitions, summed over ranks.
        groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None)
        held = {id(p) for g in groups for p in g}
        trainable_ids = {id(p) for p in engine.module.parameters() if p.requires_grad}
        moments = sum(s["exp_avg"].numel() for s in optimizer.optimizer.state.values() if "exp_avg" in s)
        total = torch.tensor([moments])
        dist.all_reduce(total)
        out = {**after, "rnn3_before": before["rnn3"], "optimizer_params_trainable": held == trainable_ids,
               "moments_numel_all_ranks": int(total), "trainable_numel": trainable_numel,
               "frozen_numel": frozen_numel, "zero_stage": engine.zero_optimization_stage()}
        engine.destroy() if hasattr(engine, "destroy") else None
        return out
    return run


for stage in (1, 2, 3):
    res.case(f"zero{stage}", zero(stage))
res.data["done"] = True
res.write()
dist.destroy_process_group()
