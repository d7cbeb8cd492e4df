"""Faults the operating system gives a reader or a converter, made real: permission denied (the
reader runs in a child process as a user who may not read the file, since the tests run as root,
which reads everything) and a full disk (a 20 MB tmpfs, with `graft convert` also run as a child
process). Each is one CheckpointError naming the file and the way out, and leaves nothing behind.
The crafted faults that need no child process are in tests/unit (test_untrusted_input.py,
test_torch_zip_records.py, test_convert.py).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from checks import trained_small_model
from convert_checks import OUT_NAME, TARGETS
from launch import REPO
from safetensors.torch import save_file
from unit.torch_zip_helpers import sample_state, saved

import graft
from graft.errors import CheckpointError

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


# -- permission denied, as a user who may not read the file -------------------------------

@functools.cache
def without_read_access() -> tuple[str, ...]:
    """A command prefix that runs a child unable to read other users' files.

    Sessions run as root, which reads everything: the child is `nobody` (setpriv), using this
    venv's python. Where `nobody` cannot execute that python, the child stays root but loses
    the two capabilities that bypass file permissions, which denies it the same files.
    """
    if subprocess.run([*NOBODY, sys.executable, "-c", "pass"], cwd="/",
                      capture_output=True).returncode == 0:
        return NOBODY
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all")


CHILD = """
import sys, graft
try:
    graft.open(sys.argv[1])
except graft.CheckpointError as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.parametrize("locked", ["folder", "file"])
def test_permission_denied_is_a_checkpoint_error(locked):
    trained_small = trained_small_model()
    # Under /tmp itself: pytest's tmp_path sits in a root-only folder, which would deny the
    # child one level too early.
    top = Path(tempfile.mkdtemp(prefix="graft-perm-"))
    try:
        path = top / "m.safetensors"
        save_file(trained_small.state_dict(), path)
        os.chmod(top, 0o755)
        if locked == "folder":  # a folder the child may not enter, owned by a third user
            os.chown(top, 65533, 65533)
            os.chmod(top, 0o700)
        else:  # a file the child may not read, in a folder it may list
            os.chown(path, 65533, 65533)
            os.chmod(path, 0o600)
        proc = subprocess.run([*without_read_access(), sys.executable, "-c", CHILD, str(path)], cwd="/",
                              capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "permission denied" in proc.stdout and str(path.parent) in proc.stdout and "way out" in proc.stdout
    finally:
        shutil.rmtree(top)


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    """Sessions run as root (which reads anything), so the reader runs in a child as nobody."""
    folder = tmp_path / "private"
    folder.mkdir()
    path = folder / "m.pth"
    path.write_bytes(saved(sample_state()))
    path.chmod(0o600)
    for p in (tmp_path, folder):
        p.chmod(0o755)
    child = (
        "import sys, graft\n"
        "from graft.loading.formats.torch_file import TorchFile\n"
        "from graft.loading.formats.base import OpenOptions\n"
        "try:\n"
        "    TorchFile(sys.argv[1], OpenOptions())\n"
        "except graft.CheckpointError as e:\n"
        "    print('CheckpointError', e)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    out = subprocess.run([*NOBODY, sys.executable, "-c", child, str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CheckpointError" in out.stdout and str(path) in out.stdout and "permission" in out.stdout.lower()


# -- a full disk under graft convert --------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs: a real full disk (CI and sessions run as root)."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs and needs root (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("to", TARGETS)
def test_full_disk_leaves_nothing(small_disk, tmp_path, to):
    src = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.full((1 << 20,), float(i)) for i in range(8)}, src)  # 32 MiB > 20 MB
    dst = small_disk / OUT_NAME[to]
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        graft.convert(src, dst, to=to, progress=False, max_shard_size="10MB")
    assert "way out" in str(err.value)
    assert list(small_disk.iterdir()) == []  # neither DST nor the temporary
    proc = subprocess.run([sys.executable, "-m", "graft.launch.cli", "convert", str(src), str(dst), "--to", to],
                          capture_output=True, text=True, cwd=REPO)
    last = proc.stderr.strip().splitlines()[-1]  # above it: the progress bar, cleared
    assert proc.returncode == 2 and last.startswith("graft: error:") and "No space left" in last, proc.stderr
    assert proc.stderr.count("graft: error:") == 1
    assert list(small_disk.iterdir()) == []
