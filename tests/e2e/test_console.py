"""The console scripts as a user runs them, each a real child process: `graft` prints one
`graft: error:` line and exits 2 on a missing or corrupt file (no traceback), and the packaged
trainer starts as `python -m graft.train` from any folder. The same commands in-process (main()
called directly) are in tests/unit/test_cli.py and tests/unit/test_launch.py.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from checks import trained_small_model
from safetensors.torch import save_file

from graft.launch.commands import TRAINER_MODULE


def test_console_script_reports_errors_cleanly(tmp_path):
    exe = Path(sys.executable).parent / "graft"
    proc = subprocess.run([str(exe), "inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


def corrupt_files(tmp_path: Path, trained_small) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    save_file(trained_small.state_dict(), good)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])  # the header's length; the header and the body follow
    files = {}
    files["length -1"] = tmp_path / "off-by-one.safetensors"
    files["length -1"].write_bytes(struct.pack("<Q", n - 1) + data[8:])
    files["deep"] = tmp_path / "deep.safetensors"
    files["deep"].write_bytes(struct.pack("<Q", 100_000) + b"[" * 100_000)
    return files


def test_graft_inspect_and_diff_on_corrupt_files_print_one_error_line_and_exit_2(tmp_path):
    exe = Path(sys.executable).parent / "graft"
    files = corrupt_files(tmp_path, trained_small_model())
    runs = [["inspect", str(files["length -1"])], ["diff", str(files["deep"]), "--model", "graft.models:tiny_vgg_rnn3"]]
    for cmd in runs:
        proc = subprocess.run([str(exe), *cmd], capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("graft: error: "), (cmd, proc.stderr)
        assert cmd[1] in lines[0] and "way out" in lines[0] and "Traceback" not in proc.stderr


def test_the_packaged_trainer_starts_as_a_module():
    """`python -m graft.train --help` works from a folder that is not the repository."""
    proc = subprocess.run([sys.executable, "-m", TRAINER_MODULE, "--help"], capture_output=True, text=True,
                          cwd="/", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "accelerate launch -m graft.train" in proc.stdout and "--resume" in proc.stdout
