"""Write real DeepSpeed ZeRO checkpoints (2 processes, CPU, gloo) for the reader's tests.

Run under torchrun: `torchrun --nproc_per_node 2 deepspeed_write.py OUT 0 1 2 3`. For
each ZeRO stage (0: ZeRO off) it trains a tiny VGG with part of the model FROZEN before
`deepspeed.initialize` (only trainable parameters go to the optimizer), saves with `save_checkpoint` into
OUT/stage{N}, and writes OUT/stage{N}/expected.pt: the full weights as the writer holds
them after training (rank 0's module; at stage 3 gathered with GatheredParameters), the
ground truth the reader is compared with. All stages run in one launch so the DeepSpeed
start-up cost is paid once.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from graft.models import tiny_vgg

# Frozen before wrapping: the first conv block and the first classifier layer. At stage 1
# DeepSpeed's own zero_to_fp32 loses exactly these.
FROZEN_PREFIXES = ("features.0.", "features.1.", "classifier.0.")
# An odd class count gives the head's bias an odd numel, so stage 3's per-rank padding of
# a partitioned parameter is exercised.
NUM_CLASSES = 5
STEPS = 3


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    # batch_norm: buffers (running stats, an int64 counter) must come through too.
    model = tiny_vgg(num_classes=NUM_CLASSES, batch_norm=True)
    for name, p in model.named_parameters():
        if name.startswith(FROZEN_PREFIXES):
            p.requires_grad_(False)
    return model


def write(stage: int, out: Path) -> None:
    model = build()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Two parameter groups (decay on matrices and kernels only, the usual recipe): the
    # partitions then hold several flat groups, as real runs do.
    groups = [{"params": [p for p in trainable if p.dim() > 1], "weight_decay": 0.01},
              {"params": [p for p in trainable if p.dim() <= 1], "weight_decay": 0.0}]
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        # torch's AdamW: DeepSpeed's own Adam variants would JIT-build C++ ops first.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(STEPS):
        x = torch.randn(4, 3, 32, 32, generator=gen)  # vgg11 halves 5 times
        y = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
    folder = out / f"stage{stage}"
    engine.save_checkpoint(str(folder))

    module = engine.module
    params = list(module.parameters())
    # At stage 3 every rank holds a slice; gathering is a collective, so all ranks enter.
    gather = deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext()
    with gather:
        if dist.get_rank() == 0:
            expected = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if dist.get_rank() == 0:
        for name, value in frozen_before.items():
            # A frozen parameter must still hold its initial value: the ground truth is
            # only trusted if the writer itself kept it.
            assert torch.equal(expected[name], value), name
        torch.save({"state_dict": expected, "frozen": sorted(frozen_before)}, folder / "expected.pt")
    dist.barrier()
    engine.destroy()


def main() -> None:
    out = Path(sys.argv[1])
    stages = [int(s) for s in sys.argv[2:]] or [0, 1, 2, 3]
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in stages:
        write(stage, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
