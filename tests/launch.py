"""Starting real multi-process runs from tests: free ports and launcher subprocesses.

Every launch has a hard timeout, so a hang fails the test instead of the whole CI run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from graft.launch.commands import free_port  # noqa: F401 - one helper for the launcher and the tests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: CPU accelerator for DeepSpeed, one shared
    extension cache (DeepSpeed's JIT build happens once per CI run), quiet threads."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run(cmd: list[str], *, timeout: float = 300, env: dict | None = None, cwd=None, check: bool = True):
    """Run a command; on failure or timeout, raise with its whole output."""
    try:
        proc = subprocess.run(cmd, env=env or child_env(), cwd=cwd or REPO, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out}\n{err}") from None
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, env=None, check=True,
             extra: list[str] = ()):
    """`torchrun --nproc_per_node N script args` on a free local port."""
    cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *extra, str(script), *map(str, args)]
    return run(cmd, timeout=timeout, env=env, check=check)
