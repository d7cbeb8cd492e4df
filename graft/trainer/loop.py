"""`run(config, resume)`: build, graft, wrap, train, save, resume. The whole loop, in one place.

Order of a start (every rank runs it):

    accelerator -> strategy -> graft.Checkpointer on the run folder (rank 0: writable probe,
    then the lock, held to the end) -> resume decision (Checkpointer.find: rank 0 picks the
    checkpoint, every rank reads it once; graft.trainer.resume checks the config) -> data ->
    model from the factory (seeded) ->
    freezing (the checkpoint's list on resume, else init.checkpoint through graft.load with
    freeze) -> fully_shard (fsdp2) -> optimizer over graft.param_groups -> prepare -> on
    resume: weights and optimizer state into the wrapped model (each rank reads its own
    ranges), schedule, sampler position, counters, RNG states (Checkpointer.resume: the same
    public API a user's own loop has; RNG last, nothing may draw after them) -> extension policy

The data order, the LR and every counter are functions of (seed, epoch, step, global sample),
so a run resumed at the same world size repeats the steps of the run that never stopped, bit
for bit; at another world size it continues with the exact saved state at the saved sample.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import graft
from graft._logging import get_logger, progress
from graft.checkpointing import faults, layout
from graft.checkpointing.checkpointer import Checkpointer
from graft.checkpointing.shard_writer import write_bytes
from graft.config import RunConfig
from graft.data import build_datasets
from graft.errors import ConfigError
from graft.sampler import EpochSampler
from graft.storage import S3Path, as_path, put_bytes
from graft.trainer import resume as resuming
from graft.trainer.metrics import MetricsWriter
from graft.trainer.schedule import Schedule
from graft.trainer.state import TrainState
from graft.trainer.strategy import make_strategy

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
        self.strategy = make_strategy(self.acc, cfg.train.strategy)
        self.is_main = self.acc.is_main_process
        self.run_dir = as_path(cfg.train.out_dir)  # a local folder or an s3:// prefix
        self.device = self.acc.device
        self.state = TrainState(world_size=self.strategy.world)
        self.summary: dict = {"run_dir": str(self.run_dir), "strategy": self.strategy.kind,
                              "world_size": self.strategy.world, "resumed_from": None, "extension": None}
        # The trainer saves and resumes through the same public API as a user's own loop.
        self.ckpt = Checkpointer(self.run_dir, keep_last=cfg.train.keep_last, config=cfg.to_dict(),
                                 seed=cfg.train.seed, async_save=cfg.train.async_save)
        try:
            self.point = self.ckpt.find(resume, required=True)
            if self.point is not None:
                self.summary["config_changes"] = resuming.check_config(self.point, cfg, allow_config_change)
        except BaseException:
            self.close()
            raise

    @property
    def last_saved(self) -> Path | S3Path | None:
        return self.ckpt.last_saved

    def close(self) -> None:
        """Wait for a background save to commit, release the run folder (rank 0's lock), upload the
        metrics of an S3 run folder. Idempotent."""
        try:
            self.ckpt.close()
        finally:
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.close()

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        _seed_all(cfg.train.seed)
        splits = build_datasets(cfg.data, cfg.train.seed)
        self.splits = splits
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        if self.point is not None:
            self.state = TrainState.from_dict({**self.point.train_state, **self.point.extra})
            graft.freeze(model, self.state.frozen)  # the weights come after wrapping (restore)
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
        self.sampler = EpochSampler(len(splits.train), cfg.data.batch_size, seed=cfg.train.seed,
                                    rank=s.rank, world_size=s.world)
        self.loader = DataLoader(splits.train, batch_sampler=self.sampler, num_workers=cfg.data.num_workers)
        full = self.sampler.batches_per_epoch()
        self.steps_per_epoch = min(full, cfg.train.max_steps_per_epoch or full)
        self.schedule = Schedule(cfg.schedule, [g["lr"] for g in self.optimizer.param_groups], self.steps_per_epoch,
                                 cfg.train.epochs * self.steps_per_epoch)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.is_main)
        if self.is_main:
            if isinstance(self.run_dir, S3Path):
                put_bytes(self.run_dir / layout.RUN_CONFIG, cfg.to_yaml().encode())
            else:
                with faults.explained(self.run_dir, layout.RUN_CONFIG):
                    write_bytes(self.run_dir / layout.RUN_CONFIG, cfg.to_yaml().encode())
        self.rank_extra: dict = {"loss_sum": 0.0, "loss_count": 0}
        self.ckpt.track(model=self.model, optimizer=self.optimizer, scheduler=self.schedule, sampler=self.sampler)
        if self.point is not None:
            self._restore()

    def _restore(self) -> None:
        p, st = self.point, self.state
        # At another world size epochs have other step counts by nature: the saved curve (a
        # function of the global step) is kept; at the same one a change means other data.
        self.schedule.require_same_steps_per_epoch = p.manifest.world_size == self.strategy.world
        start = self.ckpt.resume(p)  # weights, optimizer, schedule, sampler position, counters, RNG (last)
        self._extend_if_asked()
        saved_spe = p.extra.get("steps_per_epoch")
        if saved_spe is not None and saved_spe != self.steps_per_epoch and self.is_main:
            log.warning("an epoch takes %d steps at this world size, %d when saved: the LR schedule keeps its saved "
                        "curve over the global step", self.steps_per_epoch, saved_spe)
        self.rank_extra.update(start.counters)
        self.summary.update(resumed_from=str(p.folder), rng_policy=start.rng_policy,
                            resumed_world_size=start.saved_world_size, resumed_strategy=start.saved_strategy)
        st.resumes.append({"from": p.folder.name, "epoch": st.epoch, "step": st.step,
                           "world_size": start.saved_world_size, "strategy": start.saved_strategy})
        self.metrics.write("resume", epoch=st.epoch, step=st.step, checkpoint=p.folder.name,
                           batch_in_epoch=st.batch_in_epoch, samples_in_epoch=st.samples_in_epoch,
                           saved_world_size=start.saved_world_size, rng_policy=start.rng_policy)

    def _extend_if_asked(self) -> None:
        old_epochs = self.point.saved_config["train"]["epochs"]
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
        """Every rank writes what it holds (no gather); rank 0 commits the manifest, then rotates
        (with train.async_save: in the background; `seconds` is then the time training was blocked)."""
        st = self.state
        assert mid_epoch == (st.batch_in_epoch > 0), (mid_epoch, st.batch_in_epoch)
        result = self.ckpt.save(epoch=st.epoch, step=st.step, batch_in_epoch=st.batch_in_epoch,
                                samples_in_epoch=st.samples_in_epoch, counters=dict(self.rank_extra),
                                extra={"frozen": list(st.frozen), "resumes": list(st.resumes),
                                       "steps_per_epoch": self.steps_per_epoch})
        self.metrics.write("save", epoch=st.epoch, step=st.step, checkpoint=result.folder.name,
                           seconds=round(result.seconds, 3), bytes_per_rank=result.bytes_per_rank,
                           background=result.background)
        self.metrics.sync()  # an S3 run folder's metrics.jsonl, uploaded whole (no append there)
        return result.folder

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
        val_acc = val_loss = None
        preempted = False
        first_epoch = st.epoch
        with self.ckpt.preemption() as preempt:
            self.model.train()
            while st.epoch < cfg.train.epochs and not preempted:
                self.sampler.set_epoch(st.epoch, st.samples_in_epoch)
                # Steps left: the rest of the epoch's samples at this world size, within the cut.
                todo = min(self.sampler.batches(), max(0, self.steps_per_epoch - st.batch_in_epoch))
                bar = progress(st.batch_in_epoch + todo, f"epoch {st.epoch + 1}/{cfg.train.epochs}",
                               unit="step", enabled=cfg.train.progress and self.is_main)
                bar.update(st.batch_in_epoch)
                t0, seen, taken = time.perf_counter(), 0, 0
                with bar:
                    for x, y in self.loader:
                        if taken >= todo:
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
                        taken += 1
                        st.samples_in_epoch = self.sampler.position_after(taken)
                        seen += x.shape[0] * s.world
                        local = loss.detach().float().item()
                        self.rank_extra["loss_sum"] += local
                        self.rank_extra["loss_count"] += 1
                        rate = seen / max(1e-9, time.perf_counter() - t0)
                        if st.step % cfg.train.log_every == 0 or taken == todo:
                            mean = s.all_reduce_sum(torch.tensor([local], dtype=torch.float64,
                                                                 device=self.device)).item() / s.world
                            self.metrics.write("step", epoch=st.epoch, step=st.step, loss=mean, lr=lr,
                                               samples_per_s=round(rate, 1))
                        bar.set_postfix(loss=f"{local:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")
                        bar.update(1)
                        if preempt.should_stop(self.device):
                            preempted = True
                            break
                if preempted and taken < todo:
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
                st.batch_in_epoch = st.samples_in_epoch = 0
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
            # The end of training, or a preemption: the last checkpoint is committed before the
            # run reports it (and, preempted, before the process exits 0).
            self.ckpt.wait()
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
