"""Resume, in one place: pick the checkpoint, check the config, restore.

    point = locate(strategy, run_dir, "auto")      # every rank: rank 0 picks, all read it once
    changes = check_config(point, cfg, allow)      # refuses unsafe config changes
    ... build model, freeze point.train_state["frozen"], shard, optimizer, prepare ...
    restored = restore_run(point, strategy, adapter)   # weights, optimizer, then per-rank state

What is exact: at any world size and under any strategy the restored weights, every optimizer
state tensor and the schedule state are bitwise the saved ones, and the data continues at the
saved GLOBAL sample. At the world size that saved, each rank also gets its own RNG states and
counters back, so the continued run is bit for bit the one that never stopped. At another
world size the RNG policy is "derived": every rank's generators are seeded from (seed, global
step, rank), and that is logged; the per-rank loss sums of the epoch in progress go to rank 0
(so the epoch's mean train loss still counts them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from graft._logging import get_logger
from graft.checkpointing import layout
from graft.checkpointing.atomic import clean_leftovers
from graft.checkpointing.layout import Manifest
from graft.checkpointing.restore import RestoreStats, read_ranges, restore
from graft.config import SAFE_ON_RESUME, RunConfig, diff
from graft.errors import CheckpointError, ConfigError, GraftError
from graft.trainer.state import RNG_POLICY_DERIVED, RNG_POLICY_SAME

log = get_logger("graft.trainer")

RNG = "rng"
"""Key of a rank's RNG states: tensors `rank/<r>/rng/<k>`, metadata in state.json ranks[r]["rng"]."""
COUNTERS = "counters"
"""Key of a rank's counters (epoch loss sums) in state.json ranks[r]."""


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, read once: its manifest, train state and config."""

    folder: Path
    manifest: Manifest
    train_state: dict
    saved_config: dict


@dataclass
class Restored:
    stats: RestoreStats
    rng: tuple[dict, dict[str, torch.Tensor]] | None
    """(metadata, tensors) of this rank's generators, or None: derive them (another world size)."""
    rng_policy: str
    counters: dict


def _newest(run_dir: Path, clean: bool) -> Path:
    """The newest complete checkpoint of `run_dir` (hashes checked); newer broken ones are named.
    `clean`: remove leftovers of interrupted saves first (only in the run's own folder: another
    run's folder is read, never cleaned, since its trainer may be writing there now)."""
    if clean:
        cleaned = clean_leftovers(run_dir)
        if cleaned:
            log.warning("removed leftovers of interrupted saves in %s: %s", run_dir / layout.CHECKPOINTS, cleaned)
    folder, skipped = layout.newest_complete(run_dir, hashes=True)
    for p, why in skipped:
        log.warning("skipping checkpoint %s: %s", p, why)
    if folder is None:
        detail = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "no checkpoint folders"
        raise CheckpointError(run_dir / layout.CHECKPOINTS, f"holds no complete checkpoint to resume from ({detail})",
                              "start the run without --resume (a fresh run), or pass --resume PATH")
    return folder


def pick(run_dir: Path, resume: str | None) -> Path | None:
    """Rank 0: the checkpoint to resume from (None: a fresh run), or the reason there is none."""
    if resume is None:
        existing = [p.name for p in layout.candidates(run_dir) if (p / layout.MANIFEST).is_file()]
        if existing:
            raise ConfigError(f"train.out_dir={str(run_dir)!r} already holds checkpoints ({existing[0]}, ...): "
                              f"continue it with --resume auto, or give a new train.out_dir")
        return None
    if resume == "auto":
        return _newest(run_dir, clean=True)
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(p, "no such checkpoint or run folder (--resume)",
                              "pass --resume auto, a run folder or one of its checkpoints/epoch_* folders")
    if layout.is_run_dir(p) and not (p / layout.MANIFEST).exists():
        return _newest(p, clean=p.resolve() == run_dir.resolve())
    why = layout.problem(p, hashes=True)
    if why is not None:
        raise CheckpointError(p, f"is not a complete checkpoint: {why}",
                              "resume from an older checkpoint, or use --resume auto")
    return p


def locate(strategy, run_dir: str | Path, resume: str | None, claim=None) -> ResumePoint | None:
    """Every rank: rank 0 claims the run folder (`claim()`: probe and lock) and picks (it alone
    cleans and hashes); all get the same answer or the same error."""
    result: tuple = (None, None)
    if strategy.rank == 0:
        try:
            if claim is not None:
                claim()
            folder = pick(Path(run_dir), resume)
            result = (str(folder) if folder else None, None)
        except (GraftError, ValueError, OSError) as e:
            result = (None, e)
    path, err = strategy.broadcast_object(result)
    if err is not None:
        raise err
    if path is None:
        return None
    folder = Path(path)
    manifest = layout.read_manifest(folder)
    if manifest.version != layout.MANIFEST_VERSION:
        raise CheckpointError(folder, f"is a version-{manifest.version} run checkpoint (written before sharded "
                                      "saves); this trainer resumes version-2 checkpoints",
                              "start a new run from its weights with init.checkpoint (graft.load reads it)")
    if strategy.rank == 0:
        log.info("resuming from %s (saved by %s on %s process(es))", folder, manifest.strategy, manifest.world_size)
    train_state = json.loads((folder / layout.TRAIN_STATE).read_text())
    saved_config = yaml.safe_load((folder / layout.CONFIG).read_text())
    return ResumePoint(folder, manifest, train_state, saved_config)


def check_config(point: ResumePoint, cfg: RunConfig, allow: bool) -> dict:
    """The config changes since the checkpoint; unsafe ones refused unless `allow`."""
    changed = diff(point.saved_config, cfg.to_dict())
    unsafe = {k: v for k, v in changed.items() if k not in SAFE_ON_RESUME}
    if unsafe:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        if not allow:
            raise ConfigError(
                f"the config differs from the checkpoint's ({point.folder}) in {lines}. A resumed run may "
                f"change only {sorted(SAFE_ON_RESUME)}; pass --allow-config-change (allow_config_change=True) "
                f"to resume anyway (the result is no longer the run that never stopped)")
        log.warning("config changed on resume (allowed): %s", lines)
    return {k: list(v) for k, v in changed.items()}


def restore_run(point: ResumePoint, strategy, adapter) -> Restored:
    """Weights and optimizer state into the live (wrapped) model, then this rank's RNG and counters."""
    stats = restore(point.folder, adapter, manifest=point.manifest)
    saved_world = point.manifest.world_size
    ranks = stats.state.get("ranks") or []
    if saved_world == strategy.world:
        mine = ranks[strategy.rank]
        prefix = layout.rank_name(strategy.rank, RNG + "/")
        tensors = {}
        for name, entry in point.manifest.tensors.items():
            if name.startswith(prefix):
                t = torch.empty(entry.shape, dtype=entry.dtype)
                tensors[name[len(prefix):]] = t
        read_ranges(point.manifest, [(prefix + k, 0, t.numel(), t.reshape(-1)) for k, t in tensors.items()])
        return Restored(stats, (mine[RNG], tensors), RNG_POLICY_SAME, dict(mine.get(COUNTERS, {})))
    totals: dict = {}
    for r in ranks:
        for k, v in r.get(COUNTERS, {}).items():
            totals[k] = totals.get(k, 0) + v
    counters = totals if strategy.rank == 0 else {k: type(v)(0) for k, v in totals.items()}
    if strategy.rank == 0:
        log.warning("the checkpoint was written by %d process(es) (%s), this run has %d (%s): the restored state "
                    "is exact and the data continues at the saved global sample, but per-rank RNG states cannot "
                    "carry over: RNG policy %r (every rank's generators seeded from seed, step and rank); the "
                    "run is not bit for bit the one that never stopped", saved_world, point.manifest.strategy,
                    strategy.world, strategy.kind, RNG_POLICY_DERIVED)
    return Restored(stats, None, RNG_POLICY_DERIVED, counters)
