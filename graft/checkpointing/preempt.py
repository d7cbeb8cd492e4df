"""Preemption: SIGTERM (schedulers, `kill`) and SIGUSR1 (Slurm's `--signal=USR1@T` warning).

The handler only sets a flag. The loop checks it after each optimizer step; in a
multi-process run the ranks agree by an all-reduce (MAX) of the flag, so they all stop
after the same step even if the signal reached only some of them. Then a mid-epoch
checkpoint is written and `run` returns with `preempted=True`; train.py exits 0.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptFlag:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

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
        device = "cpu"
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return self.should_stop(device)

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce per step when distributed)."""
        local = int(self.signum or 0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # The signal number itself travels, so every rank can say which signal stopped the run.
            t = torch.tensor([local], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() and self.signum is None:
                self.signum = int(t.item())
            return bool(t.item())
        return bool(local)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"
