"""Run under a 2-process launcher: the straight run, then the same run in two sessions, compared.

    accelerate launch --multi_gpu --num_processes 2 ... train_resume_strategy.py OUT [overrides]
    torchrun --nproc_per_node 2 train_resume_strategy.py OUT train.strategy=fsdp2

Rank 0 writes OUT/result.json: whether weights, optimizer state, schedule and per-step
losses of the resumed run equal the straight run's, bit for bit.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (run_helpers)

import torch.distributed as dist  # noqa: E402

from graft.checkpointing.layout import read_manifest  # noqa: E402
from graft.trainer import run  # noqa: E402
from run_helpers import state_differences, step_lines, tiny_config  # noqa: E402

out, extra = Path(sys.argv[1]), sys.argv[2:]
straight = run(tiny_config(out / "straight", "train.epochs=4", *extra))
first = run(tiny_config(out / "resumed", "train.epochs=4", "train.session_epochs=2", *extra))
second = run(tiny_config(out / "resumed", "train.epochs=4", *extra), resume="auto")
if dist.get_rank() == 0:
    a, b = step_lines(out / "straight"), step_lines(out / "resumed")
    ckpts = {}
    for e in (2, 3, 4):
        name = f"checkpoints/epoch_{e:06d}"
        differ = state_differences(out / "straight" / name, out / "resumed" / name)
        manifest = read_manifest(out / "resumed" / name)
        ckpts[name] = {"equal": not differ, "differ": differ, "files": sorted(manifest.files),
                       "tensors": sorted(manifest.tensors)}
    result = {
        "strategy": straight["strategy"], "world_size": straight["world_size"],
        "first_epochs": first["epochs_done"], "resumed_from": second["resumed_from"],
        "epochs_done": second["epochs_done"], "steps": sorted(b),
        "losses_equal": [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(a)] and sorted(a) == sorted(b),
        "checkpoints": ckpts,
        "val_accuracy": [straight["val_accuracy"], second["val_accuracy"]],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
dist.barrier()
dist.destroy_process_group()
