"""The training loop on accelerate, run checkpoints and exact resume.

    from graft.config import load_config
    from graft.trainer import run
    summary = run(load_config("configs/digits_base.yaml", ["train.epochs=10"]), resume="auto")

Modules: loop (run, the loop), strategy (one class per strategy: wrapping and the checkpoint
adapter of Single / DDP / FSDP2 / DeepSpeed), resume (pick, config check, restore), state
(counters, RNG and its policy across world sizes), schedule (LR and extension policies),
metrics (JSONL), preempt (SIGTERM / SIGUSR1). The run-checkpoint format (layout, sharded
writer, restore), the run folder's lock and its OS faults live in graft.checkpointing; the
data order in graft.sampler.
"""

from graft.trainer.loop import run
from graft.trainer.metrics import METRICS, read_metrics

__all__ = ["run", "read_metrics", "METRICS"]
