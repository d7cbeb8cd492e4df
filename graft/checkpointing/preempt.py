"""Preemption: SIGTERM (schedulers, `kill`) and SIGUSR1 (Slurm's `--signal=USR1@T` warning).

The handler only sets a flag. The loop checks it after each optimizer step; in a
multi-process run the ranks agree by an all-reduce (MAX) of the flag, so they all stop
after the same step even if the signal reached only some of them. Then a mid-epoch
checkpoint is written and `run` returns with `preempted=True`; train.py exits 0.

The same all-reduce carries one more bit: whether this rank's background checkpoint writer has
failed (`failed`, given by the Checkpointer with async_save). If any rank's has, `on_failure`
runs on every rank after the same step and raises that failure: every rank stops together.
"""

from __future__ import annotations

import signal
from typing import Callable

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def collective_device() -> torch.device | str:
    """The device the default process group's backend talks through."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return "cpu"


def max_over_ranks(values: list[int], device: torch.device | str = "cpu") -> list[int]:
    """The element-wise maximum of `values` over every rank (one tiny all-reduce; as is in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(values, dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]
    return list(values)


class PreemptFlag:
    def __init__(self, failed: Callable[[], bool] | None = None, on_failure: Callable[[], object] | None = None):
        self.signum: int | None = None
        self._previous = {}
        self.failed, self.on_failure = failed, on_failure

    def install(self) -> "PreemptFlag":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __call__(self) -> bool:
        """`should_stop` on the device the default process group's backend talks through."""
        return self.should_stop(collective_device())

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce per step when distributed).
        Raises a background save's failure on every rank if any rank's writer failed."""
        # The signal number itself travels, so every rank can say which signal stopped the run.
        signum, failed = max_over_ranks([int(self.signum or 0), int(bool(self.failed and self.failed()))], device)
        if failed and self.on_failure is not None:
            self.on_failure()
        if signum and self.signum is None:
            self.signum = signum
        return bool(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"
