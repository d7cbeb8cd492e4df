"""Keeping ranks in step: the same call, the same plan, and one error raised on every rank.

A rank that raises alone leaves the others waiting in their next collective for ever; so
each step that may fail on some ranks ends in an exchange, after which every rank raises
the same error, or none does.
"""

from __future__ import annotations

import pickle

import torch.distributed as dist

from graft.errors import GraftError, PlanError
from graft.loading.plan import LoadPlan
from graft.loading.transfer import LoadContext


def _gather(obj, ctx: LoadContext) -> list:
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, obj)
    return gathered


# -- one error, every rank ------------------------------------------------------------------


def portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a GraftError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure means: send the text instead
        return GraftError(f"{type(exc).__name__}: {exc}")


def _raise_first(failures: list[BaseException | None], rank: int, mine: BaseException | None) -> None:
    """The rule for failures, in one place: if any rank failed, every rank raises the lowest
    failing rank's error; that rank its own exception (traceback and all), the others the
    copy they received, with a note naming the rank it came from."""
    for r, exc in enumerate(failures):
        if exc is None:
            continue
        if r == rank and mine is not None:
            raise mine
        exc.add_note(f"(raised on rank {r} and sent to every rank by graft.load)")
        raise exc


def gather_outcome(error: BaseException | None, payload, ctx: LoadContext) -> list:
    """Every rank sends its failure (or None) and a payload; any failure is raised on every
    rank (see `_raise_first`), else every rank gets every rank's payload."""
    gathered = _gather((portable(error) if error is not None else None, payload), ctx)
    _raise_first([failure for failure, _ in gathered], ctx.rank, error)
    return [p for _, p in gathered]


def outcome_from_rank0(outcome, ctx: LoadContext):
    """Rank 0 passes its result or its exception, the others None; every rank returns the
    result or raises the exception (see `_raise_first`).

    One broadcast where only rank 0 can fail: a gather would send the result once per rank.
    """
    box = [portable(outcome) if isinstance(outcome, BaseException) else outcome]
    dist.broadcast_object_list(box, src=0)
    failure = box[0] if isinstance(box[0], BaseException) else None
    _raise_first([failure], ctx.rank, outcome if ctx.rank == 0 and failure is not None else None)
    return box[0]


def agree(problem: str | None, ctx: LoadContext, what: str) -> None:
    """Every rank states its problem (or None); if any has one, every rank raises them all,
    as one PlanError."""
    bad = [(r, p) for r, p in enumerate(_gather(problem, ctx)) if p is not None]
    if bad:
        lines = "\n".join(f"  rank {r}: {p}" for r, p in bad)
        raise PlanError(
            f"{what} differs across ranks:\n{lines}\n  way out: build the same model and call"
            " graft.load with the same arguments on every rank"
        )


# -- the same call --------------------------------------------------------------------------


def check_same_call(settings: dict, ctx: LoadContext) -> None:
    """Every rank called `graft.load` with the same `settings`, else a GraftError everywhere:
    a rank taking another path would wait in another collective."""
    gathered = _gather(repr(settings), ctx)
    differ = [r for r, g in enumerate(gathered) if g != gathered[0]]
    if differ:
        raise GraftError(f"graft.load was called with other arguments on rank(s) {differ} than on rank 0:"
                         f"\n  rank 0: {gathered[0]}\n  rank {differ[0]}: {gathered[differ[0]]}"
                         "\n  way out: pass the same strategy, bucket_mb, freeze and plan options on every rank")


# -- the same plan --------------------------------------------------------------------------


def signature(plan: LoadPlan, buffers: dict[str, tuple]) -> dict[str, tuple]:
    """What must be equal on every rank: each entry's fate, shape and dtype, and the
    non-persistent buffers (name -> (shape, dtype))."""
    sig = {
        k: (e.action, e.ckpt_key, tuple(e.shape), str(e.dtype), e.is_param, e.partial, e.tied_to)
        for k, e in plan.entries.items()
    }
    for n, (shape, dtype) in buffers.items():
        sig[n] = ("buffer", None, tuple(shape), str(dtype), False, False, None)
    return sig


def _describe(sig_entry: tuple | None) -> str:
    if sig_entry is None:
        return "absent"
    action, ck, shape, dtype, _, partial, tied = sig_entry
    what = "partial" if partial else action
    return f"{what} {shape} {dtype.removeprefix('torch.')}" + (f" from {ck!r}" if ck else "")


def plan_difference(rank0: dict, mine: dict, limit: int = 5) -> str | None:
    """The first `limit` keys where two signatures differ, as one line; None if they are equal."""
    out = []
    for k in list(dict.fromkeys([*rank0, *mine])):
        if rank0.get(k) != mine.get(k):
            out.append(f"{k}: rank 0 {_describe(rank0.get(k))}, here {_describe(mine.get(k))}")
            if len(out) >= limit:
                break
    return "; ".join(out) if out else None
