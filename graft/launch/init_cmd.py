"""`graft init [DIR]`: a new project folder with a starter run config and an own-loop train.py.

    graft init my_run              # my_run/run.yaml and my_run/train.py
    graft init --slurm my_run      # ... plus train_multinode.sbatch, to edit and submit

Everything comes from the installed package (graft/templates/, graft/launch/configs/), so it
works after `pip install torch-graft` with no checkout. `run.yaml` is the starter run of
graft/templates/run.yaml resolved: every field of the run config, each under a comment with
its doc, so the file shows every knob there is; `graft train --config run.yaml` runs it.
`train.py` is graft/templates/own_loop.py as it is: a loop of the user's own on graft's public
API. A folder that already holds files is refused (they are named) unless --force.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import yaml

RUN_CONFIG = "run.yaml"
OWN_LOOP = "train.py"
SLURM_SCRIPT = "train_multinode.sbatch"


def _flow(value) -> str:
    """One YAML line for a value ({num_classes: 10}, [0.9, 0.999], 'no', null)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text.removesuffix("\n...\n").strip()  # a bare scalar document ends with '...'


def starter_config():
    """The starter run (graft/templates/run.yaml) as a resolved RunConfig."""
    from graft.config import load_config

    with resources.as_file(resources.files("graft.templates") / RUN_CONFIG) as template:
        return load_config(template)


def starter_config_text() -> str:
    """The starter run config, resolved, every field under a comment with its doc."""
    from graft.config import RunConfig, field_docs

    cfg = starter_config()
    head = resources.files("graft.templates").joinpath(RUN_CONFIG).read_text().split("\n")
    lines = [line for line in head if line.startswith("#")]  # the template's own header comment
    lines += ["# Start it:  graft train --config run.yaml [--nproc N] [section.field=value ...]", ""]
    top_docs = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        lines.append(f"# {top_docs[f.name]}")
        if not dataclasses.is_dataclass(value):
            lines.append(f"{f.name}: {_flow(value)}")
            continue
        lines.append(f"{f.name}:")
        docs = field_docs(type(value))
        for g in dataclasses.fields(value):
            lines.append(f"  # {docs[g.name]}")
            lines.append(f"  {g.name}: {_flow(getattr(value, g.name))}")
    return "\n".join(lines) + "\n"


def _files(slurm: bool) -> dict[str, tuple[str, int]]:
    """{name in the new folder: (text, mode)}."""
    own_loop = resources.files("graft.templates").joinpath("own_loop.py").read_text()
    out = {RUN_CONFIG: (starter_config_text(), 0o644), OWN_LOOP: (own_loop, 0o644)}
    if slurm:
        sbatch = resources.files("graft.launch").joinpath("configs", "slurm", SLURM_SCRIPT).read_text()
        out[SLURM_SCRIPT] = (sbatch, 0o755)
    return out


def init_project(folder: str | Path, *, force: bool = False, slurm: bool = False) -> list[Path]:
    """Write the starter files into `folder` (created if missing); the paths written.

    Raises FileExistsError naming what is there when the folder is not empty and not `force`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if present and not force:
        shown = ", ".join(present[:10]) + (f" and {len(present) - 10} more" if len(present) > 10 else "")
        raise FileExistsError(f"{folder} is not empty ({shown}); pick an empty or new folder, or pass --force "
                              f"to write {RUN_CONFIG} and {OWN_LOOP} there anyway (overwriting those two)")
    files = _files(slurm)  # everything read before anything is written: no half-made folder
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (text, mode) in files.items():
        path = folder / name
        path.write_text(text)
        path.chmod(mode)
        written.append(path)
    return written


def cmd_init(args) -> int:
    try:
        written = init_project(args.dir, force=args.force, slurm=args.slurm)
    except FileExistsError as e:
        raise SystemExit(f"graft: error: {e}") from e
    what = {RUN_CONFIG: "the starter run config: tiny VGG on the shipped digits, every field with its doc",
            OWN_LOOP: "a training loop of your own on graft's public API (its docstring says how to start it)",
            SLURM_SCRIPT: "multi-node Slurm job running `graft train` on every node (edit its #SBATCH lines)"}
    for path in written:
        print(f"wrote {path}  ({what[path.name]})")
    folder = Path(args.dir)
    train = starter_config().train
    steps = [] if folder.resolve() == Path.cwd().resolve() else [(f"cd {folder}", "")]
    steps += [(f"graft train --config {RUN_CONFIG} --nproc 2", "graft's trainer (python -m graft.train), 2 processes"),
              (f"graft resume {train.out_dir} --epochs {2 * train.epochs}", f"continue it, here to {2 * train.epochs} epochs"),
              (f"graft inspect {train.out_dir}", "what its newest checkpoint holds"),
              (f"accelerate launch {OWN_LOOP}", "or your own loop instead")]
    if args.slurm:
        steps.append((f"sbatch --nodes=2 {SLURM_SCRIPT} {RUN_CONFIG}", "graft train on 2 nodes"))
    width = max(len(command) for command, _ in steps)
    print("next:")
    for command, why in steps:
        print(f"  {command.ljust(width)}  # {why}" if why else f"  {command}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("init", help="write a starter run config and an own-loop train.py into a new folder",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default=".", help="the folder (created if missing; default: here)")
    p.add_argument("--force", action="store_true", help="write into a folder that already holds files")
    p.add_argument("--slurm", action="store_true", help=f"also write {SLURM_SCRIPT}, a multi-node Slurm job")
    p.set_defaults(func=cmd_init)
