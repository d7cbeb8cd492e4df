"""Under torchrun, 2 processes: SIGUSR1 reaches rank 1 only, mid-epoch; both ranks stop after
the same step, save one mid-epoch checkpoint, and the resumed run equals the straight run.

Rank 0 writes OUT/result.json.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (run_helpers)

import torch.distributed as dist  # noqa: E402

from graft.checkpointing import preempt  # noqa: E402
from graft.trainer import run  # noqa: E402
from run_helpers import events, state_differences, step_lines, tiny_config  # noqa: E402

out = Path(sys.argv[1])
extra = ["train.epochs=2", "train.max_steps_per_epoch=6"]
straight = run(tiny_config(out / "straight", *extra))

# Only rank 1 gets the signal, as when a scheduler signals one node first.
calls = {"n": 0}
original = preempt.PreemptFlag.should_stop


def signal_rank1_at_step_3(self, device="cpu"):
    calls["n"] += 1
    if calls["n"] == 3 and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    return original(self, device)


preempt.PreemptFlag.should_stop = signal_rank1_at_step_3
stopped = run(tiny_config(out / "resumed", *extra))
preempt.PreemptFlag.should_stop = original
saved = sorted(p.name for p in (out / "resumed" / "checkpoints").iterdir())
second = run(tiny_config(out / "resumed", *extra), resume="auto")
if dist.get_rank() == 0:
    a, b = step_lines(out / "straight"), step_lines(out / "resumed")
    name = "checkpoints/epoch_000002"
    result = {
        "preempted": stopped["preempted"], "stopped_at_step": stopped["step"], "saved": saved,
        "signal": events(out / "resumed", "preempt")[0]["signal"],
        "resumed_from": second["resumed_from"], "finished": second["finished"],
        "state_equal": not state_differences(out / "straight" / name, out / "resumed" / name),
        "losses_equal": [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(a)] and sorted(a) == sorted(b),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
dist.barrier()
dist.destroy_process_group()
