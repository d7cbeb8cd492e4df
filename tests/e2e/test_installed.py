"""graft as a user gets it: the wheel, installed outside the repository, used from an empty folder.

The wheel is built from a copy of the sources (the checkout keeps no build/ folder) with this
venv's setuptools (no download), and installed with --no-deps into a fresh virtual environment
in a temporary folder. That environment sees the dependencies already installed here through a
.pth file written after the install, so nothing is downloaded and the test stays quick; its own
site-packages comes first, so `import graft` finds the installed wheel, never the repository
(PYTHONPATH is cleared and every command runs from a folder outside it).

Whether an install keeps a user's own (allowed) torch is pip's resolver's decision, and it reads
metadata only: an environment holding metadata-only distributions (torch 2.13.0, the floor, and
the other core dependencies at their tested versions) gets the real wheel installed by real pip, with
no index. pip must keep torch 2.13.0; the same install over torch 2.12.0 must be refused. That graft
then RUNS with torch 2.13 is another claim, checked by running the core unit tests in such an
environment (pyproject.toml says which).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _run(cmd: list, *, cwd: Path, env: dict | None = None, timeout: float = 240, check: bool = True):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    output = f"$ {' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    if check:
        assert proc.returncode == 0, output
    return proc, output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "graft", src / "graft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", out, src], cwd=out, env=_offline_pip_env())
    (whl,) = out.glob("torch_graft-*.whl")
    return whl


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _new_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    return where / "bin" / "python"


def _offline_pip_env() -> dict:
    """pip with no configuration of this machine's (its find-links, extra indexes, constraints):
    with --no-index it then sees only the environment and the files named on its command line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _pip_into(python: Path, *args) -> tuple[subprocess.CompletedProcess, str]:
    """This venv's pip working on another environment (pip --python), offline."""
    return _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "-q", *args],
                cwd=python.parent, env=_offline_pip_env(), check=False, timeout=180)


@pytest.fixture(scope="module")
def user_env(wheel, tmp_path_factory) -> dict:
    """A fresh venv outside the repository with the wheel installed; the environment to run it in."""
    root = tmp_path_factory.mktemp("user")
    venv = root / "venv"
    python = _new_venv(venv)
    proc, output = _pip_into(python, "--no-deps", wheel)
    assert proc.returncode == 0, output
    # After the install (so pip never saw this checkout's editable graft): the dependencies of the
    # venv running the tests, behind the new venv's own site-packages.
    (_site_packages(venv) / "_tested_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", OMP_NUM_THREADS="1")
    work = root / "project"
    work.mkdir()
    return {"venv": venv, "python": python, "env": env, "work": work}


def test_wheel_metadata_has_ranges_that_admit_the_tested_set(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    # What an installed graft reads at run time ships inside it.
    for path in ("graft/train.py", "graft/launch/configs/accelerate/ddp.yaml",
                 "graft/launch/configs/accelerate/single.yaml", "graft/launch/configs/accelerate/fsdp2.yaml",
                 "graft/launch/configs/accelerate/deepspeed.yaml", "graft/launch/configs/deepspeed/zero1.json",
                 "graft/launch/configs/deepspeed/zero2.json", "graft/launch/configs/deepspeed/zero3.json",
                 "graft/launch/configs/slurm/train_multinode.sbatch", "graft/templates/run.yaml",
                 "graft/templates/own_loop.py"):
        assert path in names, f"{path} is not in {wheel.name}"
    assert not any(n.startswith(("tests/", "configs/", "bench/")) for n in names)

    requires = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    pins = [str(r) for r in requires if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pins, f"exact pins in the wheel's metadata: {pins}"
    torch = [r for r in requires if r.name == "torch"]
    assert len(torch) == 1 and torch[0].marker is None and torch[0].specifier, torch  # a core range
    core = {r.name for r in requires if r.marker is None}
    # training, DeepSpeed, plotting and S3 stay extras
    assert core == {"torch", "blake3", "pyyaml", "tqdm", "zlib-ng"}, core
    tested = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    tested = {k.lower().replace("_", "-"): v for k, v in tested.items()}
    for r in requires:
        if r.name == "torch-graft":
            continue
        version = tested.get(r.name.lower().replace("_", "-"))
        assert version is not None, f"{r.name} is required but constraints.txt does not pin the tested version"
        assert r.specifier.contains(version, prereleases=True), f"{r} excludes the tested {r.name}=={version}"


def test_init_train_resume_inspect_from_an_empty_folder(user_env):
    python, env, work = user_env["python"], user_env["env"], user_env["work"]
    site = _site_packages(user_env["venv"])

    # `graft` is the installed wheel's, in every process it starts.
    proc, _ = _run([python, "-c", "import graft, graft.train, graft.launch.commands as c; "
                                  "print(graft.__file__); print(c.CONFIGS)"], cwd=work, env=env)
    graft_file, configs = proc.stdout.split()
    assert Path(graft_file) == site / "graft" / "__init__.py"
    assert Path(configs) == site / "graft" / "launch" / "configs"
    assert not str(REPO) in env["PATH"] and "PYTHONPATH" not in env
    graft = user_env["venv"] / "bin" / "graft"  # the console script the wheel installed

    proc, output = _run([graft, "init"], cwd=work, env=env)
    assert sorted(p.name for p in work.iterdir()) == ["run.yaml", "train.py"], output
    assert "graft train --config run.yaml" in proc.stdout, output

    short = ["data.limit=384", "train.progress=false", "train.log_every=1"]
    proc, output = _run([graft, "train", "--config", "run.yaml", "--nproc", "2", "--device", "cpu",
                         "train.epochs=1", *short], cwd=work, env=env)
    out = proc.stdout
    # the packaged trainer and the packaged launcher configs, started by this venv's own python
    assert "# entry: python -m graft.train (the packaged trainer)" in out, output
    assert f"# accelerate config: {site / 'graft/launch/configs/accelerate/ddp.yaml'}" in out, output
    assert f" {python} -m accelerate.commands.accelerate_cli launch --config_file {site}/" in out, output
    assert re.search(r" -m graft\.train --config run\.yaml train\.epochs=1 ", out), output
    assert "done: epoch 1" in out, output
    run_dir = work / "runs" / "starter"
    assert (run_dir / "checkpoints" / "epoch_000001" / "manifest.json").is_file(), output

    proc, output = _run([graft, "resume", "runs/starter", "--epochs", "2"], cwd=work, env=env)
    assert "--nproc 2" in proc.stdout and "done: epoch 2" in proc.stdout, output  # 2 processes, as saved

    proc, output = _run([graft, "inspect", "runs/starter"], cwd=work, env=env)
    assert re.search(r"format\s+graft", proc.stdout) and "features" in proc.stdout, output


def _metadata_only_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel holding nothing but the metadata of `name==version`: what pip's resolver reads."""
    stem = f"{name.replace('-', '_')}-{version}"  # a wheel's file and folder names spell - as _
    dist = f"{stem}.dist-info"
    files = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    whl = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return whl


@pytest.mark.parametrize("torch_version, kept", [("2.13.0", True), ("2.12.0", False)])
def test_an_install_keeps_the_users_allowed_torch(wheel, tmp_path, torch_version, kept):
    tested = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    have = {"torch": torch_version, **{n: tested[k] for n, k in (("blake3", "blake3"), ("pyyaml", "PyYAML"),
                                                                   ("tqdm", "tqdm"), ("zlib-ng", "zlib-ng"))}}
    python = _new_venv(tmp_path / "venv")
    proc, output = _pip_into(python, "--no-deps", *(_metadata_only_wheel(stubs, n, v) for n, v in have.items()))
    assert proc.returncode == 0, output
    # The real wheel, its dependencies resolved by pip against what the environment holds (no index).
    proc, output = _pip_into(python, wheel)
    versions, _ = _run([python, "-c", "import importlib.metadata as m; print(m.version('torch'))"], cwd=tmp_path)
    if kept:
        assert proc.returncode == 0, output
        assert versions.stdout.strip() == "2.13.0", output  # the user's torch stays
    else:
        # Below the floor: pip wants another torch (and, offline, has none to give).
        assert proc.returncode != 0 and re.search(r"torch>=2\.13", output), output
        assert versions.stdout.strip() == "2.12.0"
