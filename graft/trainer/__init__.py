"""The training loop on accelerate, run checkpoints and exact resume.

    from graft.config import load_config
    from graft.trainer import run
    summary = run(load_config("configs/digits_base.yaml", ["train.epochs=10"]), resume="auto")

Modules: loop (run, the loop), strategy (wrapping and state per DDP / DeepSpeed / FSDP2),
checkpoint (atomic folders, manifest, rotation), state (counters, sampler, RNG),
schedule (LR and extension policies), metrics (JSONL), preempt (SIGTERM / SIGUSR1).
The run folder's lock and its OS faults (disk full, unwritable) live in graft.checkpointing.
"""

from graft.trainer.loop import run
from graft.trainer.metrics import METRICS, read_metrics

__all__ = ["run", "read_metrics", "METRICS"]
