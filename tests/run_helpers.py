"""Shared bits of the trainer tests: a tiny run config, and what two runs are compared on."""

from __future__ import annotations

import json
from pathlib import Path

from graft.config import load_config

# tiny_vgg on 32x32 digits, a few hundred samples, a few steps per epoch: seconds per run.
TINY = [
    "model.factory=graft.models:tiny_vgg",
    "data.limit=240", "data.batch_size=16", "data.val_fraction=0.25",
    "optimizer.lr=0.003", "schedule.name=cosine", "schedule.warmup_steps=3", "schedule.min_lr_ratio=0.1",
    "train.max_steps_per_epoch=4", "train.save_every=1", "train.keep_last=null", "train.log_every=1",
    "train.progress=false", "train.seed=3",
]


def tiny_overrides(out_dir, *extra: str) -> list[str]:
    return [*TINY, f"train.out_dir={out_dir}", *extra]


def tiny_config(out_dir, *extra: str):
    return load_config(None, tiny_overrides(out_dir, *extra))


def step_lines(run_dir) -> dict[int, dict]:
    """The last 'step' line of each step in RUN_DIR/metrics.jsonl (a resumed run repeats lost steps)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d["event"] == "step":
            out[d["step"]] = d
    return out


def events(run_dir, kind: str) -> list[dict]:
    return [d for d in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if d["event"] == kind]


def state_hashes(folder) -> dict[str, str]:
    """sha256 of what must be bitwise equal between two runs: weights, optimizer, schedule."""
    files = json.loads((Path(folder) / "manifest.json").read_text())["files"]
    keep = [f for f in files if f.startswith(("model.", "optimizer", "scheduler"))]
    return {f: files[f]["sha256"] for f in sorted(keep)}
