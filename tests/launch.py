"""Starting real multi-process runs from tests: launcher subprocesses, with their command lines
built by graft.launch.commands (the builder `graft train` uses), never by hand.

Two ways to start N processes of a script:

    graft_launch(script, ..., strategy=S)   exactly what `graft train --strategy S --device cpu
                                            --script SCRIPT` starts (build_command): accelerate
                                            launch with graft's packaged configs, or torchrun for
                                            fsdp. For tests of a launch.
    torchrun(script, ...)                   N processes of a script under torchrun
                                            (commands.torchrun_argv), for tests that need a process
                                            group, not a particular launch.

Every launch has a hard timeout, so a hang fails the test instead of the whole CI run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from graft.launch.commands import (  # noqa: F401 - free_port: one helper for the launcher and the tests
    Command,
    LaunchOptions,
    build_command,
    free_port,
    torchrun_argv,
)

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


def _built(build, opts: LaunchOptions, args, cwd):
    """`build(opts, args)` as made in `cwd`: the builder prints paths inside the working folder
    relative to it (as `graft train` shows them), so the command is built where it will run."""
    with contextlib.chdir(cwd):
        return build(opts, [str(a) for a in args])


def torchrun_command(script: str | Path, *args, nproc: int = 2, cwd=REPO, **options) -> list[str]:
    """`torchrun --nproc_per_node N ... script args` on a free local port (commands.torchrun_argv);
    `options` are more LaunchOptions (nodes, node_rank, main_address, main_port)."""
    return _built(torchrun_argv, LaunchOptions(nproc=nproc, script=str(script), **options), args, cwd)


def torchrun(script: str | Path, *args, nproc: int = 2, timeout: float = 300, env=None, check=True):
    """Run `script args` on `nproc` local processes under torchrun (see torchrun_command)."""
    return run(torchrun_command(script, *args, nproc=nproc), timeout=timeout, env=env, check=check)


def graft_command(script: str | Path, *args, strategy: str, nproc: int = 2, **options) -> Command:
    """What `graft train --strategy STRATEGY --nproc N --device cpu --script SCRIPT` starts, with
    `args` as the script's arguments: commands.build_command's command, built in the repository."""
    opts = LaunchOptions(nproc=nproc, strategy=strategy, device="cpu", script=str(script), **options)
    return _built(build_command, opts, args, REPO)


def graft_launch(script: str | Path, *args, strategy: str, nproc: int = 2, timeout: float = 300, env=None,
                 check=True):
    """Run `script args` on `nproc` CPU processes launched as `graft train` launches `strategy` (ddp,
    fsdp, zero1, zero2, zero3; see graft_command), with the launch's own environment variables."""
    cmd = graft_command(script, *args, strategy=strategy, nproc=nproc)
    return run(cmd.argv, timeout=timeout, env=cmd.full_env(env or child_env()), check=check)
