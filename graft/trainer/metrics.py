"""Metrics as JSON lines in RUN_DIR/metrics.jsonl, written by rank 0 only.

One object per line, always with "event" ("step" | "epoch" | "resume" | "save" | "preempt" |
"extend"), "epoch", "step", "time" (unix seconds); "step" and "epoch" lines add "loss" and
"lr", "epoch" lines "val_accuracy" and "val_loss", "step" lines "samples_per_s". A resumed
run appends to the same file; lines written after the checkpoint it resumed from (work
lost to the interruption) stay, and the "resume" line marks where the run picked up.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from graft.checkpointing.faults import explained

METRICS = "metrics.jsonl"


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self._f = None
        if enabled:
            with explained(self.path.parent, self.path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "a", buffering=1)

    def write(self, event: str, *, epoch: int, step: int, **fields) -> None:
        if not self.enabled:
            return
        line = {"event": event, "epoch": epoch, "step": step, "time": round(time.time(), 3)}
        for k, v in fields.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            line[k] = v
        with explained(self.path.parent, self.path):  # a full disk: one line, not a traceback
            self._f.write(json.dumps(line) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every line of RUN_DIR/metrics.jsonl (a torn last line from a kill is skipped)."""
    out = []
    path = Path(run_dir) / METRICS
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
