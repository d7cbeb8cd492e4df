"""`graft train`'s execute (graft.launch.train_cmd): the command runs in a child process, its exit code
and death by a signal come back, and SIGTERM / Slurm's SIGUSR1 reach the trainer, which `execute` waits
for. Real child processes; the command builder and `--dry-run` (which starts nothing) are in
tests/unit/test_launch.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from graft.launch import train_cmd
from graft.launch.commands import Command


def test_execute_prints_then_runs_and_forwards_exit_code(capfd):
    cmd = Command([sys.executable, "-c", "import os, sys; print('child', os.environ['X']); sys.exit(3)"],
                  {"X": "ok"}, notes=["why"])
    assert train_cmd.execute(cmd) == 3
    out = capfd.readouterr().out
    assert out.index("# why") < out.index("$ X=ok ") < out.index("child ok")


def test_execute_reports_death_by_signal_as_128_plus_n():
    cmd = Command([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert train_cmd.execute(cmd) == 128 + 9


# -- signals ---------------------------------------------------------------------------------------

_CHILD = r'''
import os, signal, subprocess, sys, time
out = sys.argv[1]
if len(sys.argv) > 2:
    # The "launcher": starts the "trainer" in its own process group and dies on SIGTERM at
    # once (like a single-process `accelerate launch`), leaving the trainer to finish.
    subprocess.Popen([sys.executable, __file__, out])
    time.sleep(60)
    sys.exit(0)
def handler(signum, frame):
    time.sleep(0.5)  # "writing the preemption checkpoint"
    open(out + ".got", "w").write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, handler)
open(out + ".ready", "w").close()
time.sleep(60)
'''


def _signal_when_ready(ready: Path, sig: int):
    import os
    import threading
    import time

    def go():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig, launcher", [("SIGTERM", False), ("SIGUSR1", False), ("SIGTERM", True)])
def test_signals_reach_the_trainer(tmp_path, sig, launcher):
    """SIGTERM and Slurm's SIGUSR1 reach the training process as SIGTERM, and `execute` waits
    for it to finish its checkpoint even when the launcher in between dies first."""
    import signal

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    out = tmp_path / "trainer"
    argv = [sys.executable, str(script), str(out)] + (["launcher"] if launcher else [])
    t = _signal_when_ready(Path(str(out) + ".ready"), getattr(signal, sig))
    rc = train_cmd.execute(Command(argv), drain_timeout=30)
    t.join()
    assert Path(str(out) + ".got").read_text() == "SIGTERM"
    assert rc == (0 if not launcher else 128 + signal.SIGTERM)
