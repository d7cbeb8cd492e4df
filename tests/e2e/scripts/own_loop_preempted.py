"""The own-loop template, with a real SIGTERM sent to rank 0 at its STOP_AT-th step boundary.

The signal is real (the loop's handler, the all-reduce that makes every rank stop at the same
step, the mid-epoch save); only its timing is fixed, so the test can compare step by step.
"""

import os
import signal

import runpy

from graft.checkpointing import preempt

STOP_AT = int(os.environ["STOP_AT"])
_ask = preempt.PreemptFlag.__call__
_calls = {"n": 0}


def _signal_then_ask(self) -> bool:
    _calls["n"] += 1
    if _calls["n"] == STOP_AT and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    return _ask(self)


preempt.PreemptFlag.__call__ = _signal_then_ask

if __name__ == "__main__":
    runpy.run_module("graft.templates.own_loop", run_name="__main__", alter_sys=True)
