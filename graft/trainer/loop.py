"""`run(config, resume)`: build, graft, wrap, train, save, resume. The whole loop, in one place.

Order of a start (every rank runs it):

    accelerator -> the run folder (rank 0: writable probe, then the lock, held to the end)
    -> resume decision (rank 0 picks the checkpoint, every rank gets it)
    -> data -> model from the factory (seeded) -> weights: the run checkpoint on resume,
    else init.checkpoint through graft.load with freeze -> fully_shard (fsdp2) -> optimizer
    over graft.param_groups -> accelerator.prepare -> optimizer / schedule / counters from
    the checkpoint -> extension policy -> RNG states (last: nothing may draw after them)

The data order, the LR and every counter are functions of (seed, epoch, step), so a run
resumed from any checkpoint repeats the steps of the run that never stopped, bit for bit.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

import graft
from graft._logging import get_logger, progress
from graft.checkpointing import faults
from graft.checkpointing.lock import RunDirLock
from graft.config import SAFE_ON_RESUME, RunConfig, diff
from graft.data import build_datasets
from graft.errors import CheckpointError, ConfigError, GraftError
from graft.trainer import checkpoint as ck
from graft.trainer.metrics import MetricsWriter
from graft.trainer.preempt import PreemptFlag
from graft.trainer.schedule import Schedule
from graft.trainer.state import EpochBatchSampler, TrainState, capture_rng, restore_rng
from graft.trainer.strategy import Strategy

log = get_logger("graft.trainer")


def make_accelerator(cfg: RunConfig):
    """An Accelerator that gives real process groups on CPU too (see shared/ENVIRONMENT.md)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    handlers = []
    if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without gloo named explicitly, DeepSpeed on CPU leaves each rank believing it is rank 0.
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=10)))
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # cpu=True is what turns `--multi_gpu` on a GPU-less machine into MULTI_CPU (gloo);
    # DeepSpeed must not get it (it would be dropped for a plain CPU run).
    return Accelerator(cpu=cpu and not use_ds, mixed_precision=cfg.precision, kwargs_handlers=handlers)


def build_model(cfg: RunConfig) -> torch.nn.Module:
    module, _, fn = cfg.model.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.factory={cfg.model.factory!r} cannot be imported: {e}") from e
    return factory(**cfg.model.kwargs)


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = graft.param_groups(model, weight_decay=cfg.optimizer.weight_decay)
    if not groups:
        raise ConfigError("every parameter is frozen: nothing to train (check init.freeze)")
    o = cfg.optimizer
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


class Trainer:
    """The state of one run; `run()` below is the public entry."""

    def __init__(self, cfg: RunConfig, resume: str | None, allow_config_change: bool):
        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        self.strategy = Strategy(self.acc, cfg.train.strategy)
        self.is_main = self.acc.is_main_process
        self.run_dir = Path(cfg.train.out_dir)
        self.device = self.acc.device
        self.state = TrainState(world_size=self.strategy.world)
        self.summary: dict = {"run_dir": str(self.run_dir), "strategy": self.strategy.kind,
                              "world_size": self.strategy.world, "resumed_from": None, "extension": None}
        self.lock: RunDirLock | None = None
        try:
            self.ckpt_dir = self._resolve_resume(resume)
            self.saved_cfg = None
            if self.ckpt_dir is not None:
                self.saved_cfg = yaml.safe_load((self.ckpt_dir / ck.CONFIG).read_text())
                self._check_config(allow_config_change)
        except BaseException:
            self.close()
            raise
        self.last_saved: Path | None = None

    def close(self) -> None:
        """Release the run folder (rank 0's lock). Idempotent."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- resume decision ---------------------------------------------------------------
    def _resolve_resume(self, resume: str | None) -> Path | None:
        """Rank 0 claims the run folder and decides; every rank gets the same answer or the same error."""
        result: tuple = (None, None)
        if self.is_main:
            try:
                self._claim_run_dir()
                result = (self._pick(resume), None)
            except (GraftError, ValueError, OSError) as e:
                result = (None, e)
        path, err = self.strategy.broadcast_object(result)
        if err is not None:
            raise err
        return Path(path) if path else None

    def _claim_run_dir(self) -> None:
        """Fail now, before any step, if the run folder cannot hold checkpoints or another trainer uses it.
        Only rank 0 locks: the other ranks of this job share its lock; another job's rank 0 is refused."""
        faults.check_writable(self.run_dir)
        try:
            self.lock = RunDirLock(self.run_dir).acquire()
        except OSError as e:
            err = faults.explain(e, self.run_dir, "taking the lock")
            if err is None:
                raise
            raise err from e
        log.info("locked %s (%s)", self.lock.path, self.lock.mode)

    def _pick(self, resume: str | None) -> str | None:
        if resume is None:
            existing = [p.name for p in ck.candidates(self.run_dir) if (p / ck.MANIFEST).is_file()]
            if existing:
                raise ConfigError(f"train.out_dir={str(self.run_dir)!r} already holds checkpoints ({existing[0]}, ...): "
                                 f"continue it with --resume auto, or give a new train.out_dir")
            return None
        cleaned = ck.clean_leftovers(self.run_dir)
        if cleaned:
            log.warning("removed leftovers of interrupted saves in %s: %s", self.run_dir / ck.CHECKPOINTS, cleaned)
        if resume == "auto":
            folder, skipped = ck.find_resume(self.run_dir)
            for p, why in skipped:
                log.warning("skipping checkpoint %s: %s", p, why)
        else:
            p = Path(resume)
            if not p.exists():
                raise CheckpointError(p, "no such checkpoint or run folder (--resume)",
                                      "pass --resume auto, a run folder or one of its checkpoints/epoch_* folders")
            if (p / ck.CHECKPOINTS).is_dir() and not (p / ck.MANIFEST).exists():
                # Another run's folder is read, never cleaned: its trainer may be writing there now.
                folder, skipped = ck.find_resume(p)
                for q, why in skipped:
                    log.warning("skipping checkpoint %s: %s", q, why)
            else:
                folder = ck.check_complete(p)
        log.info("resuming from %s", folder)
        return str(folder)

    def _check_config(self, allow: bool) -> None:
        changed = diff(self.saved_cfg, self.cfg.to_dict())
        unsafe = {k: v for k, v in changed.items() if k not in SAFE_ON_RESUME}
        if unsafe:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
            if not allow:
                raise ConfigError(
                    f"the config differs from the checkpoint's ({self.ckpt_dir}) in {lines}. A resumed run may "
                    f"change only {sorted(SAFE_ON_RESUME)}; pass --allow-config-change (allow_config_change=True) "
                    f"to resume anyway (the result is no longer the run that never stopped)")
            log.warning("config changed on resume (allowed): %s", lines)
        self.summary["config_changes"] = {k: list(v) for k, v in changed.items()}

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        _seed_all(cfg.train.seed)
        splits = build_datasets(cfg.data, cfg.train.seed)
        self.splits = splits
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        if self.ckpt_dir is not None:
            saved = json.loads((self.ckpt_dir / ck.TRAIN_STATE).read_text())
            self.state = TrainState.from_dict(saved)
            self._load_weights(model)
            graft.freeze(model, self.state.frozen)
        elif cfg.init.checkpoint:
            i = cfg.init
            report = graft.load(model, i.checkpoint, freeze=i.freeze, rename=[tuple(r) for r in i.rename],
                                include=i.include, exclude=i.exclude, on_mismatch=i.on_mismatch,
                                progress=cfg.train.progress)
            self.summary["load_report"] = report.to_dict() if hasattr(report, "to_dict") else str(report)
            self.state.frozen = graft.frozen_parameter_names(model)
        elif cfg.init.freeze:
            self.state.frozen = graft.freeze(model, cfg.init.freeze)
        self.summary["frozen"] = list(self.state.frozen)
        self.summary["trainable_parameters"] = sum(p.numel() for p in graft.trainable_parameters(model))
        model.to(self.device)
        model = self.strategy.shard(model)
        optimizer = build_optimizer(cfg, model)
        self.model, self.optimizer = self.strategy.prepare(model, optimizer, cfg.data.batch_size)

        s = self.strategy
        self.sampler = EpochBatchSampler(len(splits.train), cfg.data.batch_size, seed=cfg.train.seed,
                                         rank=s.rank, world_size=s.world)
        self.loader = DataLoader(splits.train, batch_sampler=self.sampler, num_workers=cfg.data.num_workers)
        full = self.sampler.batches_per_epoch()
        self.steps_per_epoch = min(full, cfg.train.max_steps_per_epoch or full)
        self.schedule = Schedule(cfg.schedule, [g["lr"] for g in self.optimizer.param_groups], self.steps_per_epoch,
                                 cfg.train.epochs * self.steps_per_epoch)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main)
        if self.is_main:
            with faults.explained(self.run_dir, ck.CONFIG):
                ck.write_bytes(self.run_dir / ck.CONFIG, cfg.to_yaml().encode())
        self.rank_extra: dict = {"loss_sum": 0.0, "loss_count": 0}
        if self.ckpt_dir is not None:
            self._restore_rest()

    def _load_weights(self, model) -> None:
        # verify="sizes": rank 0 checked every hash of this folder when it picked it (find_resume,
        # check_complete) a moment ago; hashing it again would double the cost of a resume.
        report = graft.load(model, self.ckpt_dir, format="graft", on_mismatch="error", strip_prefixes=False,
                            verbose=False, progress=False, verify="sizes")
        if report.new or report.mismatched or report.unexpected:
            raise CheckpointError(self.ckpt_dir, f"does not fit the model: new {report.new[:5]}, mismatched "
                                                 f"{report.mismatched[:5]}, unexpected {report.unexpected[:5]}",
                                  "resume with the model config the run was started with")

    def _restore_rest(self) -> None:
        d, s = self.ckpt_dir, self.strategy
        saved = json.loads((d / ck.TRAIN_STATE).read_text())
        layout = saved.get("optimizer_layout", "full")
        if layout != s.optimizer_layout or (layout == "sharded" and saved["world_size"] != s.world):
            raise CheckpointError(d, f"holds {layout} optimizer state from {saved['world_size']} processes "
                                     f"({saved.get('strategy')}), this run is {s.kind} on {s.world}",
                                  "resume with the same launcher, strategy and number of processes")
        if layout == "sharded":
            if saved.get("zero_stage") != s.zero_stage:
                raise CheckpointError(d, f"was saved at ZeRO stage {saved.get('zero_stage')}, this run uses "
                                         f"{s.zero_stage}", "resume with the same DeepSpeed config")
            osd = ck.load_tree(d / "optimizer", f"rank_{s.rank:05d}")
        else:
            osd = ck.load_tree(d, "optimizer")
        s.load_optimizer_state(self.model, self.optimizer, osd)
        self.schedule.load_state_dict(json.loads((d / ck.SCHEDULE).read_text()))
        self._extend_if_asked()
        rng_meta = json.loads((d / ck.RNG_META).read_text())
        if rng_meta["world_size"] != s.world:
            log.warning("the checkpoint was written by %d processes, this run has %d: RNG states and the data "
                        "shards differ, so the run continues but not bit for bit", rng_meta["world_size"], s.world)
        r = s.rank % rng_meta["world_size"]
        tensors = {k.split("/", 1)[1]: v for k, v in ck.read_safetensors(d / ck.RNG_TENSORS).items()
                   if k.startswith(f"rank{r}/")}
        self.rank_extra = dict(rng_meta["ranks"][r].get("extra", self.rank_extra))
        self._rng_to_restore = (rng_meta["ranks"][r]["rng"], tensors)
        self.summary["resumed_from"] = str(d)
        self.state.resumes.append({"from": d.name, "epoch": self.state.epoch, "step": self.state.step})
        self.metrics.write("resume", epoch=self.state.epoch, step=self.state.step, checkpoint=d.name,
                           batch_in_epoch=self.state.batch_in_epoch)
        log.info("resumed at epoch %d, step %d (batch %d of the epoch) from %s", self.state.epoch, self.state.step,
                 self.state.batch_in_epoch, d)

    def _extend_if_asked(self) -> None:
        old_epochs = self.saved_cfg["train"]["epochs"]
        new_epochs = self.cfg.train.epochs
        if new_epochs > old_epochs:
            info = self.schedule.extend(self.state.step, new_epochs * self.steps_per_epoch, self.cfg.schedule.on_extend)
            info.update(from_epochs=old_epochs, to_epochs=new_epochs)
            self.summary["extension"] = info
            self.metrics.write("extend", epoch=self.state.epoch, step=self.state.step, **info)
            log.info("extending the run from %d to %d epochs at step %d; schedule policy %r: lr %.3g -> %.3g",
                     old_epochs, new_epochs, self.state.step, info["policy"], info["lr_before"], info["lr_after"])
        elif new_epochs < old_epochs:
            log.warning("train.epochs lowered from %d to %d: the run stops early; the LR schedule keeps its "
                        "%d-epoch curve", old_epochs, new_epochs, old_epochs)

    # -- save --------------------------------------------------------------------------
    def save(self, mid_epoch: bool) -> Path:
        st, s = self.state, self.strategy
        name = ck.checkpoint_name(st.epoch, st.step if mid_epoch else None)
        atomic = ck.AtomicCheckpoint(self.run_dir, name, is_main=self.is_main, barrier=s.barrier)
        try:
            tmp = atomic.begin()
        except OSError as e:  # rank 0 alone makes the folder
            raise self._save_failed(atomic, e)
        weights = s.model_state(self.model)
        osd = s.optimizer_state(self.model, self.optimizer)
        rng_meta, rng_tensors = capture_rng()
        gathered = s.all_gather_object({"rng": rng_meta, "tensors": rng_tensors, "extra": self.rank_extra})
        own = None
        try:
            self._write_files(tmp, weights, osd, gathered)
        except OSError as e:
            own = e
        # Every rank learns whether any rank failed to write, so all stop with the same error
        # (instead of the others waiting at the commit's barrier for a rank that is gone).
        failures = [f for f in s.all_gather_object(own and faults.describe_failure(own, s.rank)) if f]
        if failures:
            raise self._save_failed(atomic, own, failures[0], agreed=True)
        try:
            final = atomic.commit({"epoch": st.epoch, "step": st.step, "batch_in_epoch": st.batch_in_epoch})
        except OSError as e:  # rank 0 alone commits (manifest, fsync, rename)
            raise self._save_failed(atomic, e)
        if self.is_main:
            deleted = ck.rotate(self.run_dir, self.cfg.train.keep_last, final)
            if deleted:
                log.info("keep_last=%s: deleted %s", self.cfg.train.keep_last, deleted)
        s.barrier()
        self.metrics.write("save", epoch=st.epoch, step=st.step, checkpoint=name)
        self.last_saved = final
        return final

    def _save_failed(self, atomic: ck.AtomicCheckpoint, own: OSError | None, failure: dict | None = None,
                     agreed: bool = False) -> Exception:
        """The error a failed save raises on this rank (`own`: its OSError, if it had one); rank 0
        removes the temporary folder. `agreed`: every rank is here, so rank 0 words the error
        (after the removal) and every rank raises that same one."""
        failure = failure or faults.describe_failure(own, self.strategy.rank)
        if not agreed:
            return faults.save_failed(self.run_dir, atomic.tmp, failure, remove=self.is_main, own=own)
        mine = faults.save_failed(self.run_dir, atomic.tmp, failure, remove=True, own=own) if self.is_main else None
        shared = self.strategy.broadcast_object(mine if isinstance(mine, GraftError) else None)
        if self.is_main:
            return mine
        # Not a fixable fault: each rank keeps its own exception (and traceback), if it had one.
        return shared or faults.save_failed(self.run_dir, atomic.tmp, failure, remove=False, own=own)

    def _write_files(self, tmp: Path, weights: dict, osd: dict, gathered: list) -> None:
        st, s = self.state, self.strategy
        if s.optimizer_layout == "sharded":
            ck.save_tree(tmp / "optimizer", f"rank_{s.rank:05d}", osd)
        if self.is_main:
            ck.write_safetensors(tmp / ck.MODEL, weights, metadata={"format": "pt"})
            if s.optimizer_layout == "full":
                ck.save_tree(tmp, "optimizer", osd)
            ck.write_json(tmp / ck.SCHEDULE, self.schedule.state_dict())
            ck.write_safetensors(tmp / ck.RNG_TENSORS, {f"rank{r}/{k}": v for r, g in enumerate(gathered)
                                                        for k, v in g["tensors"].items()})
            ck.write_json(tmp / ck.RNG_META, {"world_size": s.world,
                                              "ranks": [{"rng": g["rng"], "extra": g["extra"]} for g in gathered]})
            ck.write_json(tmp / ck.TRAIN_STATE, {**st.to_dict(), "world_size": s.world, "strategy": s.kind,
                                                 "optimizer_layout": s.optimizer_layout, "zero_stage": s.zero_stage})
            ck.write_bytes(tmp / ck.CONFIG, self.cfg.to_yaml().encode())

    # -- train / evaluate --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(accuracy, mean loss) on the validation split, shared across ranks (padded so every rank runs alike)."""
        s, val = self.strategy, self.splits.val
        n = len(val)
        per = -(-n // s.world)
        mine = [s.rank + s.world * i for i in range(per)]
        bs = self.cfg.data.batch_size
        batches = [mine[i : i + bs] for i in range(0, per, bs)]
        loader = DataLoader(val, batch_sampler=[[j % n for j in b] for b in batches],
                            num_workers=self.cfg.data.num_workers)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.model.eval()
        for b, (x, y) in zip(batches, loader):
            x, y = x.to(self.device), y.to(self.device)
            valid = torch.tensor([j < n for j in b], device=self.device)
            with self.acc.autocast():
                out = self.model(x)
            loss = F.cross_entropy(out.float(), y, reduction="none")
            totals[0] += ((out.argmax(1) == y) & valid).sum()
            totals[1] += (loss * valid).sum()
            totals[2] += valid.sum()
        self.model.train()
        s.all_reduce_sum(totals)
        return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()

    def train(self) -> dict:
        cfg, st, s = self.cfg, self.state, self.strategy
        preempt = PreemptFlag().install()
        if getattr(self, "_rng_to_restore", None):
            restore_rng(*self._rng_to_restore)
        val_acc = val_loss = None
        preempted = False
        first_epoch = st.epoch
        try:
            self.model.train()
            while st.epoch < cfg.train.epochs and not preempted:
                self.sampler.set_epoch(st.epoch, st.batch_in_epoch)
                bar = progress(self.steps_per_epoch, f"epoch {st.epoch + 1}/{cfg.train.epochs}",
                                              unit="step", enabled=cfg.train.progress and self.is_main)
                bar.update(st.batch_in_epoch)
                t0, seen = time.perf_counter(), 0
                with bar:
                    for x, y in self.loader:
                        if st.batch_in_epoch >= self.steps_per_epoch:
                            break
                        x, y = x.to(self.device), y.to(self.device)
                        lr = self.schedule.apply(self.optimizer, st.step)
                        with self.acc.autocast():
                            out = self.model(x)
                        loss = F.cross_entropy(out.float(), y)
                        self.acc.backward(loss)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        st.step += 1
                        st.batch_in_epoch += 1
                        seen += x.shape[0] * s.world
                        local = loss.detach().float().item()
                        self.rank_extra["loss_sum"] += local
                        self.rank_extra["loss_count"] += 1
                        rate = seen / max(1e-9, time.perf_counter() - t0)
                        if st.step % cfg.train.log_every == 0 or st.batch_in_epoch == self.steps_per_epoch:
                            mean = s.all_reduce_sum(torch.tensor([local], dtype=torch.float64,
                                                                 device=self.device)).item() / s.world
                            self.metrics.write("step", epoch=st.epoch, step=st.step, loss=mean, lr=lr,
                                               samples_per_s=round(rate, 1))
                        bar.set_postfix(loss=f"{local:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")
                        bar.update(1)
                        if preempt.should_stop(self.device):
                            preempted = True
                            break
                if preempted and st.batch_in_epoch < self.steps_per_epoch:
                    log.warning("%s received: saving at epoch %d, batch %d (step %d) and stopping", preempt.name,
                                st.epoch, st.batch_in_epoch, st.step)
                    self.metrics.write("preempt", epoch=st.epoch, step=st.step, signal=preempt.name,
                                       batch_in_epoch=st.batch_in_epoch)
                    self.save(mid_epoch=True)
                    break
                # epoch done
                sums = s.all_reduce_sum(torch.tensor([self.rank_extra["loss_sum"], self.rank_extra["loss_count"]],
                                                     dtype=torch.float64, device=self.device))
                train_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else math.nan
                val_acc, val_loss = self.evaluate()
                st.epoch += 1
                st.batch_in_epoch = 0
                self.rank_extra = {"loss_sum": 0.0, "loss_count": 0}
                self.metrics.write("epoch", epoch=st.epoch, step=st.step, loss=train_loss,
                                   lr=self.schedule.lrs(max(0, st.step - 1))[0], val_accuracy=val_acc,
                                   val_loss=val_loss)
                log.info("epoch %d/%d  step %d  train loss %.4f  val loss %.4f  val acc %.4f", st.epoch,
                         cfg.train.epochs, st.step, train_loss, val_loss, val_acc)
                session_done = cfg.train.session_epochs is not None and st.epoch - first_epoch >= cfg.train.session_epochs
                if st.epoch % cfg.train.save_every == 0 or st.epoch == cfg.train.epochs or preempted or session_done:
                    self.save(mid_epoch=False)
                    if preempted:
                        log.warning("%s received: stopped after epoch %d", preempt.name, st.epoch)
                        self.metrics.write("preempt", epoch=st.epoch, step=st.step, signal=preempt.name,
                                           batch_in_epoch=0)
                if session_done and st.epoch < cfg.train.epochs:
                    log.info("train.session_epochs=%d reached: stopping at epoch %d of %d (continue with "
                             "--resume auto)", cfg.train.session_epochs, st.epoch, cfg.train.epochs)
                    break
        finally:
            preempt.uninstall()
        if val_acc is None and not preempted:  # nothing left to train (already finished)
            val_acc, val_loss = self.evaluate()
        self.metrics.close()
        self.summary.update(epochs_done=st.epoch, step=st.step, val_accuracy=val_acc, val_loss=val_loss,
                            preempted=preempted, finished=st.epoch >= cfg.train.epochs, checkpoint=str(self.last_saved) if self.last_saved else None,
                            steps_per_epoch=self.steps_per_epoch, lr=self.schedule.lrs(max(0, st.step - 1))[0])
        return self.summary


def run(config: RunConfig, resume: str | None = None, *, allow_config_change: bool = False) -> dict:
    """Train `config` (or continue it: resume="auto" or a checkpoint / run folder path); returns a summary.

    Works in one process, under `accelerate launch` (DDP, DeepSpeed ZeRO) and under torchrun
    with train.strategy=fsdp2. Returns {"run_dir", "epochs_done", "step", "val_accuracy",
    "val_loss", "preempted", "checkpoint", "resumed_from", "extension", "frozen", ...}.
    """
    trainer = Trainer(config, resume, allow_config_change)
    try:
        trainer.setup()
        summary = trainer.train()
        trainer.strategy.barrier()
    finally:
        trainer.close()
    return summary
