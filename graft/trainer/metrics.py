"""Metrics as JSON lines in RUN_DIR/metrics.jsonl, written by rank 0 only.

One object per line, always with "event" ("step" | "epoch" | "resume" | "save" | "preempt" |
"extend"), "epoch", "step", "time" (unix seconds); "step" and "epoch" lines add "loss" and
"lr", "epoch" lines "val_accuracy" and "val_loss", "step" lines "samples_per_s". A resumed
run appends to the same file; lines written after the checkpoint it resumed from (work
lost to the interruption) stay, and the "resume" line marks where the run picked up.

A run folder on S3 cannot be appended to: the lines go to a local copy (in the staging folder,
`GRAFT_STAGING_DIR` or the system's temp folder; a resumed run first downloads the object),
and the whole file is uploaded by `sync()` (the trainer calls it after each save) and at
`close()`. A kill -9 loses the lines written since the last save, which the resume repeats.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from graft._logging import get_logger
from graft.checkpointing.atomic import staging_root
from graft.checkpointing.faults import explained
from graft.errors import GraftError
from graft.storage import S3Path, as_path, upload_file

METRICS = "metrics.jsonl"

log = get_logger("graft.trainer")


class MetricsWriter:
    def __init__(self, run_dir: str | Path | S3Path, enabled: bool = True):
        run_dir = as_path(run_dir)
        self.remote: S3Path | None = run_dir / METRICS if isinstance(run_dir, S3Path) else None
        self.path = run_dir / METRICS if self.remote is None else None
        self.enabled = enabled
        self._f = None
        self._stage: Path | None = None
        if not enabled:
            return
        if self.remote is not None:
            root = staging_root()
            with explained(root, root):
                root.mkdir(parents=True, exist_ok=True)
                # The staging folders' name: a kill -9 leaves this one, the next S3 save removes it.
                self._stage = Path(tempfile.mkdtemp(prefix=f"graft-staging-{os.getpid()}-metrics-", dir=root))
            self.path = self._stage / METRICS
            if self.remote.refresh().is_file():
                self.path.write_bytes(self.remote.read_bytes())
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

    def sync(self) -> None:
        """On S3: upload the whole file (a failure is a warning: the metrics are not the checkpoint,
        and the next sync uploads them all again). Nothing to do on a disk."""
        if self.remote is None or self._f is None:
            return
        try:
            upload_file(self.path, self.remote)
        except GraftError as e:
            log.warning("could not upload %s (%s); the next save tries again", self.remote, e)

    def close(self) -> None:
        if self._f is not None:
            self.sync()
            self._f.close()
            self._f = None
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None


def read_metrics(run_dir: str | Path | S3Path) -> list[dict]:
    """Every line of RUN_DIR/metrics.jsonl (a torn last line from a kill is skipped)."""
    out = []
    path = as_path(run_dir) / METRICS
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
