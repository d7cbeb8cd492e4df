"""Elastic resume, under any launcher (torchrun, accelerate launch, deepspeed) or in one process:
run a plan of trainer runs and restore checks, write OUT/<name>.json for each.

    torchrun --nproc_per_node 3 elastic.py OUT '[["train", "ddp_3", []], ["check", "fsdp2_2", "to_ddp3", []]]'

Steps (each a JSON list):

    ["train", NAME, OVERRIDES]        a tiny run in OUT/NAME, stopped after 2 of 4 epochs (train.strategy etc.
                                      in OVERRIDES)
    ["check", SRC, DST, OVERRIDES]    copy OUT/SRC to OUT/DST, resume it here (this launcher, this world
                                      size, OVERRIDES), save the restored state at once, then train 2 more
                                      epochs. OUT/DST.json: every logical tensor of the restored state
                                      compared with SRC's checkpoint, bitwise; the losses before and after
    ["preempt", NAME, STEP, OVERRIDES]  a run of one epoch stopped by SIGTERM after global step STEP
                                      (a mid-epoch checkpoint); every sample id each rank took is recorded
    ["continue", SRC, DST, OVERRIDES]   copy OUT/SRC, resume to the end of the epoch; sample ids recorded

The ZeRO pairs of issue 10 use the same steps under `accelerate launch --use_deepspeed`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (run_helpers)

import torch.distributed as dist  # noqa: E402

from graft.checkpointing.layout import read_manifest  # noqa: E402
from graft.sampler import EpochSampler  # noqa: E402
from graft.checkpointing import preempt  # noqa: E402
from graft.trainer.loop import Trainer  # noqa: E402
from run_helpers import events, state_differences, tiny_config  # noqa: E402

EPOCHS = 2


def rank() -> int:
    # A plan may start with a check, before the trainer has made the process group: the launcher's
    # RANK says who copies the run then.
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def epoch_losses(run_dir: Path) -> dict[int, float]:
    return {e["epoch"]: e["loss"] for e in events(run_dir, "epoch")}


def copy_run(out: Path, src: str, dst: str) -> Path:
    """OUT/SRC copied to OUT/DST by rank 0 (under a temporary name, renamed when complete: the other
    ranks wait for the name, since there may be no process group to wait on yet)."""
    if rank() == 0:
        shutil.rmtree(out / dst, ignore_errors=True)
        shutil.copytree(out / src, out / f".{dst}.copying")
        os.rename(out / f".{dst}.copying", out / dst)
    deadline = time.monotonic() + 120
    while not (out / dst).exists():
        assert time.monotonic() < deadline, f"rank 0 did not copy {src} to {dst}"
        time.sleep(0.1)
    barrier()
    return out / dst


class SampleLog:
    """Records the batches each rank's sampler hands out (the real sampler, wrapped)."""

    def __init__(self, path: Path):
        self.path, self.batches = path, []

    def __enter__(self):
        original = self.original = EpochSampler.__iter__
        log = self.batches

        def iterate(sampler):
            for batch in original(sampler):
                log.append({"epoch": sampler.epoch, "ids": list(batch)})
                yield batch

        EpochSampler.__iter__ = iterate
        return self

    def __exit__(self, *exc):
        EpochSampler.__iter__ = self.original
        self.path.write_text(json.dumps(self.batches))


def train(out: Path, name: str, overrides: list[str]) -> dict:
    # A run of EPOCHS + 2 epochs stopped after EPOCHS: resuming it needs no extension policy, so
    # the restored schedule can be compared with the saved one as it is.
    t = Trainer(tiny_config(out / name, f"train.epochs={EPOCHS + 2}", f"train.session_epochs={EPOCHS}", *overrides),
                None, False)
    t.setup()
    return t.train()


def check(out: Path, src: str, dst: str, overrides: list[str]) -> dict:
    folder = copy_run(out, src, dst)
    saved = sorted(p.name for p in (out / src / "checkpoints").iterdir())[-1]
    t = Trainer(tiny_config(folder, f"train.epochs={EPOCHS + 2}", *overrides), "auto", False)
    t.setup()
    resaved = t.save(mid_epoch=False)  # the restored state, as this world size and strategy hold it
    differ = state_differences(out / src / "checkpoints" / saved, resaved)
    summary = t.train()
    before, after = epoch_losses(out / src), epoch_losses(folder)
    return {"saved": saved, "differ": differ, "summary": summary, "losses_before": before,
            "losses_after": {e: after[e] for e in after if e > EPOCHS}, "strategy": t.strategy.kind,
            "world_size": t.strategy.world, "tensors": len(read_manifest(resaved).tensors)}


def preempted(out: Path, name: str, step: int, overrides: list[str]) -> dict:
    calls = {"n": 0}
    original = preempt.PreemptFlag.should_stop

    def stop_after(self, device="cpu"):
        calls["n"] += 1
        if calls["n"] == step and rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, device)

    preempt.PreemptFlag.should_stop = stop_after
    try:
        with SampleLog(out / f"{name}.samples{rank()}.json"):
            t = Trainer(tiny_config(out / name, "train.epochs=1", "train.max_steps_per_epoch=null", *overrides),
                        None, False)
            t.setup()
            summary = t.train()
    finally:
        preempt.PreemptFlag.should_stop = original
    return {"summary": summary, "train_samples": len(t.splits.train)}


def continued(out: Path, src: str, dst: str, overrides: list[str]) -> dict:
    folder = copy_run(out, src, dst)
    with SampleLog(out / f"{dst}.samples{rank()}.json"):
        t = Trainer(tiny_config(folder, "train.epochs=1", "train.max_steps_per_epoch=null", *overrides), "auto", False)
        t.setup()
        summary = t.train()
    return {"summary": summary, "world_size": t.strategy.world}


STEPS = {"train": train, "check": check, "preempt": preempted, "continue": continued}


def main() -> None:
    out, plan = Path(sys.argv[1]), json.loads(sys.argv[2])
    for kind, *args in plan:
        result = STEPS[kind](out, *args)
        if rank() == 0:
            (out / f"{args[1] if kind in ('check', 'continue') else args[0]}.json").write_text(
                json.dumps(result, indent=1, default=str))
        barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
