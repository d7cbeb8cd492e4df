"""`graft.Checkpointer`: graft's run checkpoints for ANY training loop, and the one graft's Trainer uses.

    ckpt = graft.Checkpointer("runs/exp1", model=model, optimizer=optimizer, scheduler=scheduler,
                              sampler=sampler, keep_last=3)
    start = ckpt.resume("auto")                    # None on the first launch: nothing saved yet
    epoch, step = (start.epoch, start.step) if start else (0, 0)
    with ckpt.preemption() as stop:                # SIGTERM / SIGUSR1 -> stop() is True on every rank
        for epoch in range(epoch, epochs):
            for batch in loader:                   # the sampler continues at the saved global sample
                ...; step += 1
                if stop():
                    ckpt.save(epoch=epoch, step=step, samples_in_epoch=sampler.position_after(...))
                    return
            ckpt.save(epoch=epoch + 1, step=step)

What it gives any loop (plain PyTorch, accelerate, a DeepSpeed engine, FSDP2), the same as the
Trainer: checkpoints written by every rank in parallel (no gather), atomically (temporary
folder, fsync, rename; a manifest with every file's size and hash written last), with no
pickle; resume from the newest complete checkpoint (every hash checked, newer broken ones
skipped and named, leftovers of interrupted saves removed); a lock so two jobs never share a
run folder; and resume at any world size and under any strategy (graft/checkpointing/restore.py).

The run folder may be an S3 prefix (`graft.Checkpointer("s3://bucket/runs/exp1", ...)`, the
`[s3]` extra) with the same guarantees: each rank uploads its own shard, the manifest object
uploaded last is the commit, a folder without one is never resumed from and is deleted by the
next resume, rotation deletes only after the commit, the lock is a lease (lock.py), and a
resume reads only each rank's byte ranges. On S3 the "every hash checked" of a resume is every
size and ETag (why: layout.problem).

What is restored, and how exactly:
- model and optimizer: every logical tensor bitwise, at any world size and strategy;
- scheduler: its state_dict (JSON), bitwise; `sampler` (an `EpochSampler`): set to the saved
  epoch and GLOBAL sample, so the data continue at the same sample at any world size;
- RNG (python, numpy, torch, CUDA) of every rank: exactly at the same world size; at another,
  each rank's generators are derived from (seed, step, rank) and a warning says so;
- `counters` (per-rank sums, e.g. of the epoch's loss): each rank its own at the same world
  size; at another, rank 0 gets the totals and the others zeros (so sums stay right);
- `extra`: any JSON the loop saves (its own counters, a config), given back in `Start.extra`.
So at the same world size a resumed loop is bit for bit the one that never stopped, if the loop
itself is deterministic; at another the restored state is exact and the losses that follow are
not (reductions add in another order).

With `async_save=True` a save blocks the loop only while each rank copies what it will write
into a reused host buffer (at most its own shard, pinned on GPUs) and captures the small state;
a background thread writes, hashes, fsyncs and commits (graft/checkpointing/async_save.py).
At most one save is in flight (the next waits for the commit, and logs how long); a background
failure is raised on every rank at the next `save()`, `wait()`, `check()`, `close()` or
`stop()` of `preemption()` (which checks it after every step, with no extra collective). The
loop must call `wait()` (or `close()`) before it exits, so the last checkpoint is committed.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import yaml

from graft._logging import get_logger
from graft.checkpointing import faults, layout
from graft.checkpointing.async_save import AsyncWriter
from graft.checkpointing.atomic import clean_leftovers
from graft.checkpointing.layout import Manifest
from graft.checkpointing.lock import RunDirLock, S3Lease
from graft.checkpointing.preempt import PreemptFlag, collective_device, max_over_ranks
from graft.checkpointing.restore import RestoreStats, read_ranges, restore
from graft.checkpointing.rng import RNG_POLICY_DERIVED, RNG_POLICY_SAME, capture_rng, derive_rng, restore_rng
from graft.checkpointing.save import SaveResult, broadcast, prepare, rank_world, write
from graft.checkpointing.slices import StateAdapter
from graft.checkpointing.torch_adapter import TorchAdapter
from graft.errors import CheckpointError, ConfigError, GraftError
from graft.storage import S3Path, as_path

log = get_logger("graft.checkpointing")

RNG = "rng"
"""Key of a rank's RNG states: tensors `rank/<r>/rng/<k>`, metadata in state.json ranks[r]["rng"]."""
COUNTERS = "counters"
"""Key of a rank's counters in state.json ranks[r]."""
POSITION = ("epoch", "step", "batch_in_epoch", "samples_in_epoch")
"""Where a loop stands, in train_state.json beside the loop's `extra`."""


# -- what a loop is given back ----------------------------------------------------------------

@dataclass
class ResumePoint:
    """The checkpoint a run continues from, read once (metadata only: no tensor yet)."""

    folder: Path | S3Path
    manifest: Manifest
    train_state: dict
    """train_state.json: the position (epoch, step, ...), the saving run's world size and strategy,
    and the loop's `extra`."""
    saved_config: dict | None
    """config.yaml of the checkpoint, if the loop saved one (`Checkpointer(config=...)`)."""

    @property
    def extra(self) -> dict:
        return dict(self.train_state.get("extra") or {})


@dataclass
class Start:
    """Where a resumed loop continues."""

    epoch: int
    """Epochs completed."""
    step: int
    """Optimizer steps taken in the whole run."""
    samples_in_epoch: int
    """Samples of epoch `epoch` already consumed by all ranks together (0: start the epoch)."""
    batch_in_epoch: int
    """Steps of epoch `epoch` already taken (at the saving world size)."""
    extra: dict
    """The loop's own JSON, as saved."""
    counters: dict
    """This rank's counters (see the module doc for another world size)."""
    folder: Path | S3Path
    rng_policy: str
    """"restored" (same world size) or "derived" (another: generators seeded from seed, step, rank)."""
    saved_world_size: int
    saved_strategy: str | None
    stats: RestoreStats = field(repr=False)


# -- which adapter a model needs ----------------------------------------------------------------

def _is_deepspeed_engine(model) -> bool:
    engine = sys.modules.get("deepspeed.runtime.engine")
    return engine is not None and isinstance(model, engine.DeepSpeedEngine)


def _unwrap_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state_dict names are the logical names: without DDP's `module.`, or
    torch.compile's `_orig_mod.` (an FSDP2 module is its own: fully_shard adds no prefix)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (and similar wrappers)."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and \
            hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _is_fsdp2(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def adapter_for(model, optimizer) -> StateAdapter:
    """The adapter of what the loop trains: a DeepSpeed engine (its ZeRO partitions), or a torch
    module (plain, DDP, FSDP2; accelerate's wrappers taken off) with its torch optimizer."""
    if _is_deepspeed_engine(model):
        if model.zero_optimization_stage() == 0:
            raise ConfigError("a DeepSpeed engine without ZeRO (stage 0): run checkpoints support ZeRO 1-3; "
                              "use zero_optimization.stage >= 1, or train the module without DeepSpeed")
        from graft.checkpointing.zero import ZeroAdapter

        return ZeroAdapter(model)
    module = _unwrap_module(model)
    _, world = rank_world()
    kind = "fsdp2" if _is_fsdp2(module) else ("ddp" if world > 1 else "single")
    return TorchAdapter(module, _unwrap_optimizer(optimizer), kind)


def describe(adapter: StateAdapter) -> dict:
    """What train_state.json and the manifest record of the saving strategy."""
    out = {"strategy": adapter.kind, "world_size": rank_world()[1]}
    if getattr(adapter, "stage", None) is not None:
        out["zero_stage"] = adapter.stage
    return out


# -- finding the checkpoint to resume -----------------------------------------------------------

def newest(run_dir: Path | S3Path, clean: bool) -> Path | S3Path | None:
    """The newest complete checkpoint of `run_dir` (hashes checked; on S3 sizes and ETags, see
    layout.problem), None if it has no checkpoint folder at all; an error if it has some and none
    is complete. `clean`: remove leftovers of interrupted saves first (only in the run's own folder:
    another run's trainer may be writing); on S3 those are the folders without a manifest."""
    if clean:
        cleaned = clean_leftovers(run_dir)
        if cleaned:
            log.warning("removed leftovers of interrupted saves in %s: %s", run_dir / layout.CHECKPOINTS, cleaned)
    folder, skipped = layout.newest_complete(run_dir, hashes=True)
    for p, why in skipped:
        log.warning("skipping checkpoint %s: %s", p, why)
    if folder is None and skipped:
        detail = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(run_dir / layout.CHECKPOINTS, f"holds no complete checkpoint to resume from ({detail})",
                              "start a fresh run in another folder, or resume from a checkpoint you name")
    return folder


def _same_folder(a: Path | S3Path, b: Path | S3Path) -> bool:
    if isinstance(a, S3Path) or isinstance(b, S3Path):
        return a == b
    return a.resolve() == b.resolve()


def pick(run_dir: Path | S3Path, resume: str | Path | S3Path | None, required: bool = False) -> Path | S3Path | None:
    """Rank 0: the checkpoint to resume from (None: a fresh run), or the reason there is none.

    resume: None (a fresh run: refused if the folder already holds checkpoints), "auto" (the
    newest complete one; None if there is none yet, an error if `required`), or a run folder or
    checkpoint folder path (checked the same way; another run's folder is only read)."""
    if resume is None:
        if isinstance(run_dir, S3Path):
            run_dir.refresh()
        existing = [p.name for p in layout.candidates(run_dir) if (p / layout.MANIFEST).is_file()]
        if existing:
            raise ConfigError(f"train.out_dir={str(run_dir)!r} already holds checkpoints ({existing[0]}, ...): "
                              f"continue it with --resume auto, or give a new train.out_dir")
        return None
    if resume == "auto":
        folder = newest(run_dir, clean=True)
        if folder is None and required:
            raise CheckpointError(run_dir / layout.CHECKPOINTS, "holds no complete checkpoint to resume from (none saved yet)",
                                  "start the run without --resume (a fresh run), or pass --resume PATH")
        return folder
    p = as_path(resume)
    if isinstance(p, S3Path):
        p.refresh()
    if not p.exists():
        raise CheckpointError(p, "no such checkpoint or run folder (--resume)",
                              "pass --resume auto, a run folder or one of its checkpoints/epoch_* folders")
    if layout.is_run_dir(p) and not (p / layout.MANIFEST).exists():
        folder = newest(p, clean=_same_folder(p, run_dir))
        if folder is None:
            raise CheckpointError(p, "holds no checkpoint to resume from", "name a run folder that has one")
        return folder
    why = layout.problem(p, hashes=True)
    if why is not None:
        raise CheckpointError(p, f"is not a complete checkpoint: {why}",
                              "resume from an older checkpoint, or use --resume auto")
    return p


def read_point(folder: Path | S3Path) -> ResumePoint:
    """The checkpoint's manifest, train state and config (every rank reads them; small files)."""
    manifest = layout.read_manifest(folder)
    if manifest.version != layout.MANIFEST_VERSION:
        raise CheckpointError(folder, f"is a version-{manifest.version} run checkpoint (written before sharded "
                                      "saves); resuming needs version 2",
                              "start a new run from its weights (graft.load reads it)")
    try:
        train_state = json.loads((folder / layout.TRAIN_STATE).read_text())
        config = folder / layout.CONFIG
        saved_config = yaml.safe_load(config.read_text()) if config.is_file() else None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CheckpointError(folder, f"its train state or config cannot be read ({e})",
                              "the checkpoint is damaged; use an older one") from e
    return ResumePoint(folder, manifest, train_state, saved_config)


# -- the checkpointer -----------------------------------------------------------------------------

class Checkpointer:
    """Save and resume a run from any loop; see the module doc. Call every method on every rank."""

    def __init__(self, run_dir: str | Path, *, model=None, optimizer=None, scheduler=None, sampler=None,
                 keep_last: int | None = None, config: dict | None = None, seed: int = 0, lock: bool = True,
                 async_save: bool = False):
        """run_dir: the run folder (checkpoints/ goes inside), or an s3:// prefix. model/optimizer:
        what the loop trains, wrapped or not (accelerate, DDP, FSDP2, a DeepSpeed engine and its
        optimizer). scheduler:
        anything with state_dict()/load_state_dict() whose state is JSON (torch LR schedulers are).
        sampler: a `graft.EpochSampler`, set to the saved position on resume. keep_last: keep
        that many complete checkpoints (older ones are deleted after each commit; None keeps all).
        config: a JSON/YAML-able dict saved as config.yaml (given back as ResumePoint.saved_config).
        seed: the base of the derived RNG policy (another world size). lock: rank 0 takes the run
        folder's lock now (a second job on it is refused, naming the holder) and proves it writable.
        async_save: `save()` returns after a snapshot; the files are written and committed by a
        background thread (see the module doc). In a multi-process job this makes a gloo process
        group for that thread, here, on every rank."""
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last={keep_last}; use >= 1 or None (keep every checkpoint)")
        self.run_dir = as_path(run_dir)
        self.keep_last, self.config, self.seed = keep_last, config, seed
        self.model, self.optimizer, self.scheduler, self.sampler = model, optimizer, scheduler, sampler
        self.rank, self.world = rank_world()
        self.lock: RunDirLock | S3Lease | None = None
        self.last_saved: Path | S3Path | None = None
        """The newest checkpoint this Checkpointer has committed."""
        self.writer: AsyncWriter | None = None
        if async_save:
            # The writer thread's collectives must not share a group with the loop's (see async_save).
            group = dist.new_group(backend="gloo") if self.world > 1 else None
            self.writer = AsyncWriter(group)
        if lock:
            self._agree(self._claim)

    # -- the run folder ---------------------------------------------------------------------------
    def _agree(self, fn):
        """Run `fn` on rank 0; every rank returns its result or raises its error (no rank waits)."""
        result: tuple = (None, None)
        if self.rank == 0:
            try:
                result = (fn(), None)
            except (GraftError, ValueError, OSError) as e:
                result = (None, e)
        value, err = broadcast(result)
        if err is not None:
            raise err
        return value

    def _claim(self) -> None:
        """Fail now, before any step, if the folder cannot hold checkpoints or another job uses it.
        Only rank 0 locks: the other ranks of this job share its lock."""
        faults.check_writable(self.run_dir)
        if isinstance(self.run_dir, S3Path):
            self.lock = S3Lease(self.run_dir).acquire()
            log.info("locked %s (%s)", self.lock.path, self.lock.mode)
            return
        try:
            self.lock = RunDirLock(self.run_dir).acquire()
        except OSError as e:
            err = faults.explain(e, self.run_dir, "taking the lock")
            if err is None:
                raise
            raise err from e
        log.info("locked %s (%s)", self.lock.path, self.lock.mode)

    def close(self) -> None:
        """Wait for a save in flight to commit (raising its failure), then release the run folder
        (rank 0's lock). Idempotent."""
        try:
            self.wait()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def track(self, *, model=None, optimizer=None, scheduler=None, sampler=None) -> "Checkpointer":
        """Give (or replace) what is saved and restored, e.g. once the model is built after `find()`."""
        for name, value in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                            ("sampler", sampler)):
            if value is not None:
                setattr(self, name, value)
        return self

    # -- resume -----------------------------------------------------------------------------------
    def find(self, resume: str | Path | None = "auto", *, required: bool = False) -> ResumePoint | None:
        """The checkpoint to continue from, read on every rank (metadata only): rank 0 picks it
        (cleans leftovers, checks every hash), every rank gets the same answer or the same error.
        Use it before building the model when the checkpoint decides something (what was frozen)."""
        path = self._agree(lambda: (str(p) if (p := pick(self.run_dir, resume, required)) else None))
        if path is None:
            return None
        point = read_point(as_path(path))
        if self.rank == 0:
            log.info("resuming from %s (saved by %s on %s process(es))", point.folder, point.manifest.strategy,
                     point.manifest.world_size)
        return point

    def resume(self, resume: str | Path | ResumePoint | None = "auto", *, required: bool = False) -> Start | None:
        """Restore everything given from the checkpoint `find(resume)` picks (or the point given);
        None when there is none (a fresh run). Call it after the model, optimizer and scheduler
        are built and wrapped, right before the loop (it restores RNG last)."""
        point = resume if isinstance(resume, ResumePoint) else self.find(resume, required=required)
        if point is None:
            return None
        if self.model is None:
            raise ValueError("Checkpointer.resume: no model to restore into (pass model=, or call track())")
        stats = restore(point.folder, adapter_for(self.model, self.optimizer), manifest=point.manifest)
        if self.scheduler is not None:
            self._restore_scheduler(point)
        ts = point.train_state
        start = {k: int(ts.get(k, 0)) for k in POSITION}
        if self.sampler is not None:
            self.sampler.set_epoch(start["epoch"], start["samples_in_epoch"])
        saved_world = point.manifest.world_size
        ranks = stats.state.get("ranks") or []
        if saved_world == self.world and len(ranks) == self.world:
            mine = ranks[self.rank]
            self._restore_rng(point.manifest, mine)
            counters, policy = dict(mine.get(COUNTERS, {})), RNG_POLICY_SAME
        else:
            totals: dict = {}
            for r in ranks:
                for k, v in r.get(COUNTERS, {}).items():
                    totals[k] = totals.get(k, 0) + v
            counters = totals if self.rank == 0 else {k: type(v)(0) for k, v in totals.items()}
            derive_rng(self.seed, start["step"], self.rank)
            policy = RNG_POLICY_DERIVED
            if self.rank == 0:
                log.warning("the checkpoint was written by %d process(es) (%s), this run has %d: the restored "
                            "state is exact and the data continue at the saved global sample, but per-rank RNG "
                            "states cannot carry over: RNG policy %r (every rank's generators seeded from seed, "
                            "step and rank); the run is not bit for bit the one that never stopped",
                            saved_world, point.manifest.strategy, self.world, RNG_POLICY_DERIVED)
        log.info("resumed at epoch %d, step %d (sample %d of the epoch) from %s in %.2fs (%.1f MB read on this "
                 "rank)", start["epoch"], start["step"], start["samples_in_epoch"], point.folder, stats.seconds,
                 stats.bytes_read / 1e6)
        return Start(**start, extra=point.extra, counters=counters, folder=point.folder, rng_policy=policy,
                     saved_world_size=saved_world, saved_strategy=point.manifest.strategy, stats=stats)

    def _restore_scheduler(self, point: ResumePoint) -> None:
        path = point.folder / layout.SCHEDULE
        if not path.is_file():
            raise CheckpointError(point.folder, f"has no {layout.SCHEDULE} (it was saved without a scheduler)",
                                  "resume without scheduler=, or from a checkpoint saved with one")
        self.scheduler.load_state_dict(json.loads(path.read_text()))
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            # The optimizer holds the LR the SAVED lambda set for the next step; a LambdaLR is a
            # closed form of its step, so the lambda this run built gives the LR now: the same
            # value bit for bit when the lambda is the same, the new curve at once when the
            # horizon was extended (lr_lambda_for_extension).
            sched = self.scheduler
            lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
            for group, lr in zip(sched.optimizer.param_groups, lrs):
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            sched._last_lr = lrs

    def _restore_rng(self, m: Manifest, mine: dict) -> None:
        prefix = layout.rank_name(self.rank, RNG + "/")
        tensors = {name[len(prefix):]: torch.empty(e.shape, dtype=e.dtype)
                   for name, e in m.tensors.items() if name.startswith(prefix)}
        read_ranges(m, [(prefix + k, 0, t.numel(), t.reshape(-1)) for k, t in tensors.items()])
        restore_rng(mine[RNG], tensors)

    # -- save -------------------------------------------------------------------------------------
    def save(self, *, epoch: int, step: int, samples_in_epoch: int = 0, batch_in_epoch: int = 0,
             extra: dict | None = None, counters: dict | None = None) -> SaveResult:
        """Write checkpoint `epoch_<epoch>` (or `epoch_<epoch>_step_<step>` when `samples_in_epoch`
        > 0: a mid-epoch stop) from every rank at once; returns after the commit on every rank
        (with async_save: after the snapshot, `background=True`; `seconds` is the time blocked).

        epoch: epochs completed; step: optimizer steps taken; samples_in_epoch: samples of the
        epoch in progress consumed by all ranks together (`EpochSampler.position_after`);
        extra: the loop's JSON (same on every rank; rank 0's is kept); counters: this rank's
        additive numbers (see the module doc)."""
        if self.model is None:
            raise ValueError("Checkpointer.save: no model to save (pass model=, or call track())")
        if self.writer is not None and self.writer.busy:  # at most one save in flight
            t0, previous, writing = time.perf_counter(), self.writer.name, self.writer.writing
            self.wait()
            if writing and self.rank == 0:
                log.info("waited %.2fs for the previous save (%s) to commit before saving again",
                         time.perf_counter() - t0, previous)
        adapter = adapter_for(self.model, self.optimizer)
        mid = samples_in_epoch > 0 or batch_in_epoch > 0
        name = layout.checkpoint_name(epoch, step if mid else None)
        position = {"epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
                    "samples_in_epoch": samples_in_epoch}
        rng_meta, rng_tensors = capture_rng()
        files = None
        if self.rank == 0:
            files = {layout.TRAIN_STATE: {**position, **describe(adapter), "extra": dict(extra or {})}}
            if self.scheduler is not None:
                files[layout.SCHEDULE] = self.scheduler.state_dict()
            if self.config is not None:
                files[layout.CONFIG] = yaml.safe_dump(self.config, sort_keys=False).encode()
        group = self.writer.group if self.writer is not None else None
        prepared = prepare(self.run_dir, name, adapter, files=files,
                           rank_tensors={layout.rank_name(self.rank, f"{RNG}/{k}"): v for k, v in rng_tensors.items()},
                           rank_state={RNG: rng_meta, COUNTERS: dict(counters or {})}, group=group,
                           guard=self.lock.check if isinstance(self.lock, S3Lease) else None)
        info = {**position, **describe(adapter)}
        if self.writer is None:
            return self._committed(write(prepared, info=info, keep_last=self.keep_last))
        self.writer.submit(prepared, info=info, keep_last=self.keep_last)
        blocked = time.perf_counter() - prepared.started
        if self.rank == 0:
            log.info("snapshot of %s taken in %.2fs (%s MB per rank); writing in the background", name, blocked,
                     "/".join(f"{b / 1e6:.1f}" for b in prepared.bytes_per_rank))
        return SaveResult(prepared.atomic.final, prepared.bytes_per_rank, blocked, background=True)

    def _committed(self, result: SaveResult) -> SaveResult:
        if self.rank == 0:
            log.info("saved %s in %.2fs: %s MB per rank", result.folder, result.seconds,
                     "/".join(f"{b / 1e6:.1f}" for b in result.bytes_per_rank))
            if result.deleted:
                log.info("keep_last=%s: deleted %s", self.keep_last, result.deleted)
        self.last_saved = result.folder
        return result

    def wait(self) -> SaveResult | None:
        """Block until the save in flight (async_save) has committed; its result (None if none was in
        flight). A failure of it is raised here, the same on every rank; the previous checkpoint stays."""
        if self.writer is None:
            return None
        result = self.writer.wait()
        return self._committed(result) if result is not None else None

    def check(self) -> None:
        """Raise a background save's failure now, on every rank at the same call (a local poll and one
        tiny all-reduce when distributed). Loops inside `preemption()` get this from `stop()`."""
        if self.writer is None:
            return
        if max_over_ranks([int(self.writer.failed())], collective_device())[0]:
            self.wait()

    # -- preemption -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def preemption(self) -> Iterator[PreemptFlag]:
        """SIGTERM and SIGUSR1 (Slurm's warning) set a flag instead of killing the process; the loop
        asks `stop()` after each step (all ranks agree, by an all-reduce), saves, and returns."""
        flag = PreemptFlag(*((self.writer.failed, self.wait) if self.writer is not None else ())).install()
        try:
            yield flag
        finally:
            flag.uninstall()


def lr_lambda_for_extension(fn, *, saved_total: int, new_total: int, at_step: int, policy: str):
    """A `LambdaLR` lambda for a run whose horizon grows from `saved_total` to `new_total` steps at
    `at_step`, from `fn(step, total) -> factor` (the loop's own schedule as a function of its
    horizon). Policies, as graft's Trainer names them:

    continue  the old curve goes on as a function of the step; past its end it holds its last value
    restart   the old curve up to `at_step`, then the schedule again over the steps that remain
    stretch   the curve recomputed for the new horizon, as if configured so from the start

    Why a function of the horizon: a torch LR scheduler's state_dict holds its counters
    (last_epoch, base_lrs, _last_lr), never its lambda (code), so what the steps after an
    extension get is decided by the lambda the resumed loop builds; this builds it from one rule.
    """
    if policy == "continue":
        return lambda step: fn(min(step, saved_total - 1), saved_total)
    if policy == "restart":
        return lambda step: fn(step, saved_total) if step < at_step else fn(step - at_step, new_total - at_step)
    if policy == "stretch":
        return lambda step: fn(step, new_total)
    raise ValueError(f"policy={policy!r}; use 'continue', 'restart' or 'stretch'")


__all__ = ["Checkpointer", "ResumePoint", "Start", "adapter_for", "lr_lambda_for_extension", "pick"]
