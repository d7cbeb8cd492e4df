"""`graft.open`, `graft.plan`, `graft.load`: the public entry points of the loading core."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from graft._logging import get_logger
from graft.freezing import freeze as freeze_names
from graft.loading.distributed import (
    DEFAULT_BUCKET_MB,
    Strategy,
    check_strategy,
    distributed_active,
    distributed_transfer,
    materialize_meta,
    require_rank0_values,
)
from graft.loading.formats import Checkpoint, OpenOptions, open_checkpoint
from graft.loading.formats.base import reject_unknown_options, warn_unused_options
from graft.loading.formats.failures import checkpoint_errors
from graft.loading.plan import LoadPlan, OnMismatch
from graft.loading.plan import plan as make_plan
from graft.loading.report import LoadReport
from graft.loading.transfer import LoadContext, LocalTransfer, Transfer

log = get_logger("graft")


def open(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    container: str | None = None,
    allow_globals: Sequence[str] = (),
    trust_pickle: bool = False,
    tag: str | None = None,
    model_index: int = 0,
    verify: str = "sha256",
    adapter_name: str | None = None,
    **unknown,
) -> Checkpoint:
    """Open a checkpoint lazily (names, shapes, dtypes; no tensor read). See OpenOptions.

    An option graft does not know is a TypeError; one the opened format does not use, a warning.
    """
    # Caught here, not by Python's own TypeError, to name the valid options and the near miss.
    reject_unknown_options(unknown)
    options = OpenOptions(container=container, allow_globals=tuple(allow_globals), trust_pickle=trust_pickle,
                          tag=tag, model_index=model_index, verify=verify, adapter_name=adapter_name)
    # Readers parse untrusted bytes; whatever low-level error escapes one (permission denied,
    # an I/O error, a parser's ValueError) reaches the caller as a CheckpointError naming the file.
    with checkpoint_errors(path):
        ckpt = open_checkpoint(path, options, format=format)
    try:
        warn_unused_options(ckpt)
    except BaseException:  # warnings raised as errors: the caller never gets `ckpt` to close
        ckpt.close()
        raise
    return ckpt


def plan(
    model: torch.nn.Module,
    ckpt: Checkpoint | str | os.PathLike,
    *,
    rename: Sequence[tuple[str, str]] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    on_mismatch: OnMismatch = "skip",
    strip_prefixes: bool = True,
    **open_options,
) -> LoadPlan:
    """The dry run: what `load` would do, from metadata only. `print(plan)` shows the table."""
    plan_kwargs = dict(rename=rename, include=include, exclude=exclude, on_mismatch=on_mismatch,
                       strip_prefixes=strip_prefixes)
    if isinstance(ckpt, Checkpoint):
        return make_plan(model, ckpt, **plan_kwargs)
    with open(ckpt, **open_options) as opened:
        return make_plan(model, opened, **plan_kwargs)


def load(
    model: torch.nn.Module,
    ckpt: Checkpoint | str | os.PathLike | None,
    *,
    freeze: str | Sequence[str] | None = None,
    rename: Sequence[tuple[str, str]] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    on_mismatch: OnMismatch = "skip",
    strip_prefixes: bool = True,
    progress: bool = True,
    verbose: bool = True,
    distributed: bool | None = None,
    strategy: Strategy = "broadcast",
    bucket_mb: float = DEFAULT_BUCKET_MB,
    **open_options,
) -> LoadReport:
    """Load what fits from `ckpt` into `model`, optionally freeze it, and report every key.

    freeze: None (train everything), "loaded" (exactly the parameters loaded in full), or
    a list of names / glob patterns. Nothing in the model changes unless the plan and every
    needed file check out first.

    Distributed (torch.distributed initialised, world size > 1, `distributed` not False):
    call on every rank, before wrapping. With strategy="broadcast" only rank 0 opens
    `ckpt` (the others may pass a path that does not exist there, or None); it sends the
    tensors in buckets (`bucket_mb` of staging memory per rank), and every rank also gets
    rank 0's values of the tensors the checkpoint does not fill (new, mismatched), so all
    ranks end identical. strategy="every-rank" has each rank read the file itself (the
    file must exist on every rank; fastest for a warm file on one machine) and still sends
    rank 0's values of the rest. A model on the `meta` device (ranks other than 0) is
    materialised, then filled. Every rank returns the same LoadReport; a failure on any
    rank raises the same error on every rank. `distributed=True` insists (an error if no
    process group), False loads this process alone.
    """
    if freeze not in (None, "none", "loaded") and isinstance(freeze, str):
        raise ValueError(f"freeze={freeze!r}; use None, 'loaded', or a list of names/glob patterns")
    ctx = LoadContext.begin(
        model, plan_kwargs=dict(rename=rename, include=include, exclude=exclude, on_mismatch=on_mismatch,
                                strip_prefixes=strip_prefixes),
        bucket_mb=bucket_mb, show_progress=progress, distributed=distributed_active(distributed),
    )
    # open -> plan -> validate -> transfer -> freeze -> report, on every path; only the
    # transfer differs (one process, rank 0 broadcasting, every rank reading).
    transfer = _choose_transfer(ctx, strategy, settings={"freeze": freeze})
    source = transfer.source(ckpt)
    try:
        opened, own, the_plan = _open_plan_validate(source, ctx, open_options)
    except Exception as e:  # noqa: BLE001 - in a process group every rank must raise it
        transfer.failed(e)
    try:
        the_plan, stats = transfer.run(opened, the_plan)
    finally:
        if own:
            opened.close()
    report = LoadReport(the_plan, stats.bytes_read, stats.seconds, _freeze(model, the_plan, freeze))
    if verbose:
        log.info("\n%s", report)
    return report


def _choose_transfer(ctx: LoadContext, strategy: Strategy, *, settings: dict) -> Transfer:
    """The one step of `load` that differs: one process, or a distributed strategy."""
    if ctx.world == 1:
        check_strategy(strategy)
        return LocalTransfer(ctx)
    return distributed_transfer(ctx, strategy, settings=settings)


def _open_plan_validate(ckpt: Checkpoint | str | os.PathLike, ctx: LoadContext,
                        open_options: dict) -> tuple[Checkpoint, bool, LoadPlan]:
    """Open `ckpt` (unless it is open already), plan, and check every byte the plan reads
    is on disk; returns (checkpoint, whether we opened it, plan), and closes what it opened
    if a step fails."""
    own = not isinstance(ckpt, Checkpoint)
    opened = open(ckpt, **open_options) if own else ckpt
    try:
        # Several ranks: a model built on `meta` gets memory now and its values from the
        # stream. One process has no rank 0 to take values from: load_into refuses it.
        materialized = materialize_meta(ctx.model) if ctx.world > 1 else []
        the_plan = make_plan(ctx.model, opened, **ctx.plan_kwargs)
        if ctx.rank == 0:
            require_rank0_values(the_plan, materialized)
        opened.validate(e.ckpt_key for e in the_plan.entries.values() if e.reads_bytes)
    except BaseException:
        if own:
            opened.close()
        raise
    return opened, own, the_plan


def _freeze(model: torch.nn.Module, the_plan: LoadPlan, freeze: str | Sequence[str] | None) -> list[str]:
    if freeze == "loaded":
        loaded = set(the_plan.loaded)
        return freeze_names(model, [n for n, _ in model.named_parameters() if n in loaded])
    if freeze in (None, "none"):
        return []
    return freeze_names(model, freeze)
