"""The property every fuzzed checkpoint must satisfy, shared by the fuzz tests.

For each mutant: graft either reads exactly what the reference reader returns, or raises
CheckpointError; never another exception, never a hang, never an allocation much beyond
the file, never a value the reference refuses to give; and a failed `graft.load` leaves
the model exactly as it was.
"""

from __future__ import annotations

import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import graft

# Per mutant; a hang or a quadratic blow-up shows up as far more than this.
MAX_SECONDS = 5.0


class Holder(nn.Module):
    """A model whose buffers are the reference tensors' names, shapes and dtypes, set to a
    value no checkpoint here holds, so any write shows."""

    def __init__(self, like: dict[str, torch.Tensor]):
        super().__init__()
        for key, value in like.items():
            self.register_buffer(key, torch.full_like(value, 3))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, with dtype and shape (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class Outcomes:
    """Counts what happened, so a test can show that both branches were exercised."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.stricter: Counter = Counter()  # kinds graft refused although the reference read them

    def __str__(self):
        return f"{dict(self.counts)}; stricter than the reference on {dict(self.stricter)}"


def check(path: Path, kind: str, reference: Callable[..., dict[str, torch.Tensor]],
          like: dict[str, torch.Tensor], outcomes: Outcomes) -> None:
    """Assert the property for the checkpoint at `path` (a file or folder) of mutation `kind`.

    reference(path, keys=None): the reference reader's tensors (of `keys` only, if given).
    """
    try:
        expected = reference(path)
    except BaseException as e:  # noqa: BLE001 - a pyo3 panic is a BaseException, and a refusal too
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        expected = None

    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    started = time.perf_counter()
    tracemalloc.start()
    try:
        got = None
        with graft.open(path) as ckpt:
            metas = [ckpt.meta(k) for k in ckpt.keys()]
            # What graft would allocate to hold the tensors, before it reads one.
            assert sum(m.nbytes for m in metas) <= size, f"{kind}: header promises more bytes than the file has"
            got = {m.key: ckpt.tensor(m.key) for m in metas}
    except graft.CheckpointError as e:
        assert str(e.path) and e.way_out, f"{kind}: {e}"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    assert seconds < MAX_SECONDS, f"{kind}: took {seconds:.1f}s"
    assert peak < 64 * size + (4 << 20), f"{kind}: peak Python allocation {peak} for a {size}-byte checkpoint"

    if got is not None:
        assert expected is not None, f"{kind}: graft read a checkpoint the reference refuses"
        assert got.keys() == expected.keys(), kind
        for key in got:
            assert same(got[key], expected[key]), f"{kind}: {key} differs from the reference"
        outcomes.counts["read, equal to the reference"] += 1
    else:
        outcomes.counts["CheckpointError"] += 1
        if expected is not None:
            outcomes.stricter[kind.split(": ", 1)[-1]] += 1

    # graft.load: a refusal leaves every buffer as it was; a load writes the reference's values.
    model = Holder(like)
    before = snapshot(model)
    try:
        report = graft.load(model, path, verbose=False, progress=False)
    except graft.CheckpointError:
        assert_unchanged(model, before)
        assert got is None, f"{kind}: graft.load refused what graft.open read"
        return
    if got is None:
        # Lazy formats read only what the plan needs (an index opens only the shards of planned
        # keys), so a load may succeed where reading every key failed; what it loaded must
        # still be what the reference gives for those keys.
        expected = reference(path, report.loaded)
        outcomes.counts["graft.load of the sound part"] += 1
    state = model.state_dict()
    for key in report.loaded:
        assert same(state[key], expected[key].to(state[key].dtype)), f"{kind}: loaded {key} differs"
