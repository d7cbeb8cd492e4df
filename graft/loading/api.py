"""`graft.open`, `graft.plan`, `graft.load`: the public entry points of the loading core."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from graft._logging import get_logger
from graft.freezing import freeze as freeze_names
from graft.loading.broadcast import (
    DEFAULT_BUCKET_MB,
    STRATEGIES,
    Strategy,
    distributed_active,
    distributed_load,
)
from graft.loading.formats import Checkpoint, OpenOptions, open_checkpoint
from graft.loading.formats.base import checkpoint_errors
from graft.loading.plan import LoadPlan, OnMismatch
from graft.loading.plan import plan as make_plan
from graft.loading.report import LoadReport
from graft.loading.transfer import load_into

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
    **extra,
) -> Checkpoint:
    """Open a checkpoint lazily (names, shapes, dtypes; no tensor read). See OpenOptions."""
    options = OpenOptions(container=container, allow_globals=tuple(allow_globals), trust_pickle=trust_pickle,
                          tag=tag, model_index=model_index, extra=extra)
    # Readers parse untrusted bytes; whatever low-level error escapes one (permission denied,
    # an I/O error, a parser's ValueError) reaches the caller as a CheckpointError naming the file.
    with checkpoint_errors(path):
        return open_checkpoint(path, options, format=format)


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
    if not isinstance(ckpt, Checkpoint):
        with open(ckpt, **open_options) as opened:
            return make_plan(model, opened, rename=rename, include=include, exclude=exclude,
                             on_mismatch=on_mismatch, strip_prefixes=strip_prefixes)
    return make_plan(model, ckpt, rename=rename, include=include, exclude=exclude,
                     on_mismatch=on_mismatch, strip_prefixes=strip_prefixes)


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
    plan_kwargs = dict(rename=rename, include=include, exclude=exclude, on_mismatch=on_mismatch,
                       strip_prefixes=strip_prefixes)
    if distributed_active(distributed):
        the_plan, stats = distributed_load(
            model, ckpt, open_fn=lambda path: open(path, **open_options), plan_kwargs=plan_kwargs,
            strategy=strategy, bucket_mb=bucket_mb, show_progress=progress,
            settings={"freeze": freeze},
        )
    else:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}; choose one of {STRATEGIES}")
        own = not isinstance(ckpt, Checkpoint)
        opened = open(ckpt, **open_options) if own else ckpt
        try:
            the_plan = make_plan(model, opened, **plan_kwargs)
            stats = load_into(model, the_plan, opened, show_progress=progress)
        finally:
            if own:
                opened.close()
    if freeze == "loaded":
        loaded = set(the_plan.loaded)
        frozen = freeze_names(model, [n for n, _ in model.named_parameters() if n in loaded])
    elif freeze in (None, "none"):
        frozen = []
    else:
        frozen = freeze_names(model, freeze)
    report = LoadReport(the_plan, stats.bytes_read, stats.seconds, frozen)
    if verbose:
        log.info("\n%s", report)
    return report
