"""What the benchmarks measure about their own process, and the page-cache states they set.

Memory from /proc/self/status (RssAnon and RssFile apart: a private copy and a file
mapping cost differently), storage reads from /proc/self/io (read_bytes counts only what
came from the device, so a warm load reads 0).
"""

from __future__ import annotations

import os
import threading
import time

_MB = 1 << 20


def status_kb() -> dict[str, int]:
    """RssAnon, RssFile, VmRSS and VmHWM of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def read_bytes() -> int:
    """Bytes this process has fetched from storage so far."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def written_bytes() -> int:
    """Bytes this process has sent to storage so far (/proc/self/io write_bytes: file data it
    dirtied; sockets and pipes do not count)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


class PeakRss:
    """Peak RssAnon / RssFile above the level at entry, sampled every `interval` s in a thread.

    After the block: `extra_anon`, `extra_file` (bytes) and `samples`.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def _sample(self) -> None:
        s = status_kb()
        self.peak = [max(self.peak[0], s["RssAnon"]), max(self.peak[1], s["RssFile"])]
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        s = status_kb()
        self.base = [s["RssAnon"], s["RssFile"]]
        self.peak = list(self.base)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()  # the level at exit counts too (a short load may fall between samples)
        self.extra_anon = (self.peak[0] - self.base[0]) * 1024
        self.extra_file = (self.peak[1] - self.base[1]) * 1024


def drop_cache(files) -> None:
    """Cold: evict the files' pages from the page cache."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(files) -> None:
    """Warm: read the files once so their pages are cached."""
    buf = bytearray(16 * _MB)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while fh.readinto(buf):
                pass


def _child(fn, spec: dict, conn) -> None:
    import traceback

    try:
        result = fn(spec)
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    conn.send(result)
    conn.close()


def run_in_child(fn, spec: dict, mpctx, timeout: float = 900) -> dict:
    """`fn(spec)` (a module-level function returning a dict) in a fresh process of `mpctx`;
    its result, or {"error": traceback} when it raised, died or ran past `timeout`."""
    recv, send = mpctx.Pipe(duplex=False)
    proc = mpctx.Process(target=_child, args=(fn, spec, send))
    proc.start()
    send.close()
    result = None
    if recv.poll(timeout):
        try:
            result = recv.recv()
        except EOFError:
            pass
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return result if result is not None else {"error": f"child died (exit code {proc.exitcode}) or timed out"}


def launch_workers(script: str, settings: dict, nproc: int = 2, repo: str | None = None) -> None:
    """`torchrun --nproc_per_node N script` on a free local port, the worker's settings in the
    environment (GRAFT_BENCH_WORKER, JSON): torchrun's own parser would take abbreviations of
    its options (--st -> --standalone) from the script's arguments."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = repo or str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
               GRAFT_BENCH_WORKER=json.dumps(settings))
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), script]
    subprocess.run(cmd, check=True, env=env)
