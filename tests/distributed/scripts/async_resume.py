"""Run under a 2-process launcher with train.async_save: the synchronous straight run, the
asynchronous straight run, and the asynchronous run in two sessions, compared.

    accelerate launch --multi_gpu --num_processes 2 ... async_resume.py OUT
    torchrun --nproc_per_node 2 async_resume.py OUT train.strategy=fsdp2

Rank 0 writes OUT/result.json: for each checkpoint, the names whose values differ (async vs sync
at the same step; resumed vs straight), and whether the per-step losses are the same.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (run_helpers)

import torch.distributed as dist  # noqa: E402

from graft.trainer import run  # noqa: E402
from run_helpers import events, state_differences, step_lines, tiny_config  # noqa: E402

out, extra = Path(sys.argv[1]), sys.argv[2:]
ASYNC = "train.async_save=true"
sync = run(tiny_config(out / "sync", "train.epochs=4", *extra))
straight = run(tiny_config(out / "straight", "train.epochs=4", ASYNC, *extra))
first = run(tiny_config(out / "resumed", "train.epochs=4", "train.session_epochs=2", ASYNC, *extra))
second = run(tiny_config(out / "resumed", "train.epochs=4", ASYNC, *extra), resume="auto")
if dist.get_rank() == 0:
    ckpt = lambda run_name, e: out / run_name / f"checkpoints/epoch_{e:06d}"  # noqa: E731
    losses = {name: step_lines(out / name) for name in ("sync", "straight", "resumed")}
    result = {
        "strategy": straight["strategy"], "world_size": straight["world_size"],
        "resumed_from": second["resumed_from"], "epochs_done": second["epochs_done"],
        "async_vs_sync": {e: state_differences(ckpt("straight", e), ckpt("sync", e)) for e in (1, 2, 3, 4)},
        "resumed_vs_straight": {e: state_differences(ckpt("resumed", e), ckpt("straight", e)) for e in (2, 3, 4)},
        "steps": {name: sorted(v) for name, v in losses.items()},
        "losses_equal": len({tuple(v[s]["loss"] for s in sorted(v)) for v in losses.values()}) == 1,
        "background": [e["background"] for e in events(out / "straight", "save")],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
dist.barrier()
dist.destroy_process_group()
