"""Your own training loop with graft's run checkpoints (graft.Checkpointer): sharded, atomic,
hash-checked saves; resume from the newest complete one, bit for bit at the same world size and
with the exact state at another; SIGTERM/SIGUSR1 save at the next step; a longer horizon for
your own LR schedule.

    accelerate launch --num_processes 2 train.py --out runs/own --epochs 10    # DDP (GPUs)
    accelerate launch --use_deepspeed --deepspeed_config_file ds.json ... train.py --out ...
    torchrun --nproc_per_node 2 train.py --out runs/own --fsdp2                  # FSDP2
    python train.py --out runs/own                                               # one process

Run the same command again to continue (resume is automatic); raise --epochs to extend a
finished run (--policy says what the added steps' learning rate does). On a CPU-only machine
add `--multi_gpu --mixed_precision no` to `accelerate launch` (the Accelerator below asks for
gloo). The data are the 8x8 digits that ship inside scikit-learn; the model is graft's tiny VGG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.utils.data import DataLoader

import graft
from graft.config import DataConfig
from graft.data import build_datasets
from graft.models import tiny_vgg


def lr_factor(step: int, total: int, warmup: int = 3) -> float:
    """Linear warm-up, then cosine to 10%: a function of the step AND the horizon (for extensions)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def make_accelerator() -> Accelerator:
    # On a CPU-only machine several processes need gloo named explicitly (and DeepSpeed must not
    # get cpu=True); on GPUs these lines change nothing.
    cpu, deepspeed = not torch.cuda.is_available(), os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10))] \
        if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else []
    return Accelerator(cpu=cpu and not deepspeed, kwargs_handlers=handlers)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the run folder (checkpoints/ and losses.jsonl go inside)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--session-epochs", type=int, default=None, help="stop this launch after N epochs")
    p.add_argument("--policy", choices=("continue", "restart", "stretch"), default="stretch",
                   help="what the LR does when --epochs grows past the saved run's")
    p.add_argument("--fsdp2", action="store_true", help="shard with torch's fully_shard (under torchrun)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=240, help="samples of the digits set to use")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-restore", metavar="DIR", help="after resuming, save the restored state to DIR and stop")
    args = p.parse_args(argv)

    acc = make_accelerator()
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(args.seed)
    data = build_datasets(DataConfig(limit=args.limit, batch_size=args.batch_size), args.seed)
    model = tiny_vgg().to(acc.device)
    if args.fsdp2:
        from torch.distributed.device_mesh import init_device_mesh

        model = graft.wrap_fsdp2(model, init_device_mesh(acc.device.type, (world,)))
    optimizer = torch.optim.AdamW(graft.trainable_parameters(model), lr=args.lr)

    # The data order is a function of (seed, epoch); its position is the GLOBAL sample count.
    sampler = graft.EpochSampler(len(data.train), args.batch_size, seed=args.seed, rank=rank, world_size=world)
    loader = DataLoader(data.train, batch_sampler=sampler)
    total = args.epochs * sampler.batches_per_epoch()

    # Rank 0 locks the run folder (a second job on it is refused) for as long as this block runs.
    with graft.Checkpointer(args.out, keep_last=3, seed=args.seed) as ckpt:
        point = ckpt.find("auto")  # the checkpoint to continue from (None on the first launch)
        fn = lambda step: lr_factor(step, total)  # noqa: E731
        if point is not None and point.extra.get("total_steps", total) != total:  # a longer (or shorter) run: say how
            fn = graft.lr_lambda_for_extension(lr_factor, saved_total=point.extra["total_steps"], new_total=total,
                                               at_step=point.train_state["step"], policy=args.policy)
            acc.print(f"horizon {point.extra['total_steps']} -> {total} steps, LR policy {args.policy}")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

        if not args.fsdp2:
            if acc.state.deepspeed_plugin is not None:  # no dataloader goes through prepare: say the batch
                acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
            model, optimizer = acc.prepare(model, optimizer)
        ckpt.track(model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler)
        start = ckpt.resume(point)  # weights, optimizer, scheduler, data position, RNG; last before the loop
        if args.check_restore:
            with graft.Checkpointer(args.check_restore, model=model, optimizer=optimizer, scheduler=scheduler) as c:
                c.save(epoch=start.epoch, step=start.step, extra={"total_steps": total})
            return "checked"

        epoch, step = (start.epoch, start.step) if start else (0, 0)
        first, log = True, Path(args.out) / "losses.jsonl"
        with ckpt.preemption() as stop:
            while epoch < args.epochs:
                if not (first and start):  # a resumed epoch continues where the sampler was put
                    sampler.set_epoch(epoch)
                first, taken = False, 0
                for x, y in loader:
                    x, y = x.to(acc.device), y.to(acc.device)
                    lr = scheduler.get_last_lr()[0]
                    loss = F.cross_entropy(model(x), y)
                    acc.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step, taken = step + 1, taken + 1
                    mean = acc.reduce(loss.detach().double(), reduction="mean").item()
                    if acc.is_main_process:
                        with log.open("a") as f:
                            f.write(json.dumps({"epoch": epoch, "step": step, "loss": mean, "lr": lr}) + "\n")
                    if stop():  # SIGTERM / SIGUSR1 on any rank: save where we are, on every rank
                        ckpt.save(epoch=epoch, step=step, samples_in_epoch=sampler.position_after(taken),
                                  extra={"total_steps": total})
                        acc.print(f"preempted at step {step}: saved; run the same command to continue")
                        return "preempted"
                epoch += 1
                ckpt.save(epoch=epoch, step=step, extra={"total_steps": total})
                if args.session_epochs and epoch - (start.epoch if start else 0) >= args.session_epochs:
                    return "session done"
        return "finished"


if __name__ == "__main__":
    print(main())
    if torch.distributed.is_initialized():  # leave together: a rank exiting early can abort the others
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
