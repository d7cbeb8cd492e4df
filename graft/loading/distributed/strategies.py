"""The two distributed transfers, each the `Transfer` step of `graft.load` on every rank.

Both end alike: every rank compares its plan with rank 0's and allocates the stream (any
problem raised everywhere), the bytes move, and the final exchange raises any rank's
failure everywhere, or gives every rank rank 0's figures, so every report is equal.
"""

from __future__ import annotations

import os
import time
from typing import ClassVar, NoReturn

import torch

from graft._logging import get_logger
from graft.loading.distributed.agreement import (
    agree,
    gather_outcome,
    outcome_from_rank0,
    plan_difference,
    signature,
)
from graft.loading.distributed.remote import Rank0Plan, RemoteCheckpoint
from graft.loading.distributed.stream import Stream
from graft.loading.distributed.wire import Destinations, stream_items
from graft.loading.formats.base import Checkpoint
from graft.loading.plan import LoadPlan
from graft.loading.transfer import LoadContext, TransferStats, load_into

log = get_logger("graft")


class _Distributed:
    name: ClassVar[str]

    def __init__(self, ctx: LoadContext):
        self.ctx = ctx

    def _agreed_stream(self, rank0: tuple[LoadPlan, dict], mine: tuple[LoadPlan, dict], dests: Destinations, *,
                       order: list[str], ckpt: Checkpoint | None) -> Stream:
        """This rank's plan checked against rank 0's `(plan, buffers)`, and the stream of
        `order` (then rank 0's values of the rest) allocated; a problem on any rank (another
        model, no memory) is raised on every rank."""
        problem = None
        stream = None
        if self.ctx.rank != 0:
            problem = plan_difference(signature(*rank0), signature(*mine))
        if problem is None:
            try:
                plan, buffers = rank0
                stream = Stream(stream_items(plan, order, buffers), plan=plan, dests=dests, ckpt=ckpt, ctx=self.ctx)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                problem = f"{type(e).__name__}: {e}"
        agree(problem, self.ctx, "the model (or its plan)")
        return stream

    def _finish(self, local: BaseException | None, figures: tuple[int, float] | None) -> TransferStats:
        """The last exchange: any rank's failure is raised everywhere; else rank 0's `figures`."""
        bytes_read, seconds = gather_outcome(local, figures if self.ctx.rank == 0 else None, self.ctx)[0]
        if self.ctx.rank == 0:
            log.info(f"graft: {self.name} load over {self.ctx.world} ranks: {bytes_read / 1e6:.1f} MB read on"
                     f" rank 0 in {time.perf_counter() - self.ctx.start:.2f} s")
        return TransferStats(bytes_read, seconds)


class Rank0Broadcast(_Distributed):
    """strategy="broadcast": rank 0 opens, plans and reads; it sends its metadata and plan
    in one message, then every byte. The other ranks plan against that metadata."""

    name = "broadcast"

    def source(self, ckpt: Checkpoint | str | os.PathLike | None) -> Checkpoint | str | os.PathLike:
        if self.ctx.rank != 0:
            # Rank 0's outcome: the metadata to plan against, or its error, raised here too.
            return RemoteCheckpoint(outcome_from_rank0(None, self.ctx))
        if ckpt is None:
            self.failed(ValueError("rank 0 needs the checkpoint: pass its path or a Checkpoint"))
        return ckpt

    def failed(self, error: Exception) -> NoReturn:
        if self.ctx.rank == 0:
            outcome_from_rank0(error, self.ctx)  # the others raise it where they wait for the metadata
        else:
            # Rank 0's metadata arrived, this rank's own plan failed: rank 0 waits in the
            # agreement step, which raises this on every rank.
            agree(f"{type(error).__name__}: {error}", self.ctx, "the model (or its plan)")
        raise error  # not reached: both exchanges above raise

    def run(self, opened: Checkpoint, plan: LoadPlan) -> tuple[LoadPlan, TransferStats]:
        dests = Destinations.of(self.ctx.model)
        if self.ctx.rank == 0:
            try:
                sent = Rank0Plan.of(opened, plan, dests.buffers)
            except Exception as e:  # noqa: BLE001 - every failure must reach every rank
                self.failed(e)
            outcome_from_rank0(sent, self.ctx)
        else:
            assert isinstance(opened, RemoteCheckpoint), "ranks other than 0 plan against rank 0's metadata"
            sent = opened.sent
        stream = self._agreed_stream((sent.plan, sent.buffers), (plan, dests.buffers), dests, order=sent.order,
                                     ckpt=opened)
        with torch.no_grad():
            local = stream.run()
        figures = (opened.bytes_read, time.perf_counter() - self.ctx.start)
        return sent.plan, self._finish(local, figures)


class EveryRankRead(_Distributed):
    """strategy="every-rank": every rank opens, plans and reads the file itself; rank 0's
    values of everything the checkpoint does not fill are then sent."""

    name = "every-rank"

    def source(self, ckpt: Checkpoint | str | os.PathLike | None) -> Checkpoint | str | os.PathLike:
        if ckpt is None:
            self.failed(ValueError("strategy='every-rank' needs the checkpoint on every rank"))
        return ckpt

    def failed(self, error: Exception) -> NoReturn:
        gather_outcome(error, None, self.ctx)  # the others raise it after they planned
        raise error  # not reached: the exchange above raises

    def run(self, opened: Checkpoint, plan: LoadPlan) -> tuple[LoadPlan, TransferStats]:
        dests = Destinations.of(self.ctx.model)
        mine = (plan, dests.buffers)
        rank0 = gather_outcome(None, mine if self.ctx.rank == 0 else None, self.ctx)[0]
        stream = self._agreed_stream(rank0, mine, dests, order=[], ckpt=None)
        local = None
        figures = None
        try:
            stats = load_into(self.ctx.model, plan, opened, show_progress=self.ctx.show_progress)
            figures = (stats.bytes_read, time.perf_counter() - self.ctx.start)
        except Exception as e:  # noqa: BLE001 - the stream below must still run on every rank
            local = e
        with torch.no_grad():
            local = stream.run() or local
        return rank0[0], self._finish(local, figures)
