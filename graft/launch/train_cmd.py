"""`graft train`, `graft resume` and `graft plot`: start the trainer the way the strategy needs.

    graft train --config run.yaml --nproc 2 train.epochs=5
    graft resume runs/digits_base --epochs 10 --policy continue
    graft plot runs/digits_base -o curves.png

The trainer is the packaged `python -m graft.train` (`--script FILE` starts another one with
the same arguments); the launcher configs are the package's own (graft/launch/configs/) unless
--accelerate-config / --ds-config name others. `train` and `resume` print the command line
they run and why it looks that way (the entry and the launcher configs among it), run it, and
exit with its exit code; 2 (with one `graft: error:` line) when the trainer stopped on a user
or environment problem, even behind a launcher that reports every failure as 1. A run folder
that is unwritable or locked by another trainer fails here, before any launcher starts.
SIGINT, SIGTERM and SIGUSR1 (Slurm's warning before the time limit) reach the training
processes as SIGINT/SIGTERM: torchrun's agent, which accelerate uses, forwards only those to
the workers, and the trainer answers both by saving a checkpoint and exiting.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from graft.checkpointing.layout import RUN_CONFIG  # the resolved config the trainer writes into every run folder
from graft.errors import GraftError
from graft.launch.commands import (
    ENV_ERROR_FILE,
    STRATEGIES,
    Command,
    LaunchOptions,
    build_command,
    resolve_device,
)

FSDP_OVERRIDE = "train.strategy=fsdp2"


# ---------------------------------------------------------------------------------------- options

def _add_launch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch")
    g.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine (default: the GPUs torch sees, else 1)")
    g.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="ddp | fsdp (FSDP2) | zero1 | zero2 | zero3 (DeepSpeed); default: fsdp when the config "
                        "says train.strategy: fsdp2, else ddp")
    g.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: GPU when torch sees one, else CPU (gloo)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="accelerate's mixed precision (default: the config's `precision`)")
    g.add_argument("--accelerate-config", metavar="YAML",
                   help="accelerate config instead of the packaged one (graft/launch/configs/accelerate/)")
    g.add_argument("--ds-config", metavar="JSON",
                   help="DeepSpeed config instead of the packaged graft/launch/configs/deepspeed/zeroN.json")
    g.add_argument("--script", metavar="FILE",
                   help="training script to start instead of the packaged trainer (python -m graft.train); "
                        "it gets the same arguments: --config, --resume, overrides")
    g.add_argument("--dry-run", action="store_true", help="print the command and exit without running it")
    g.add_argument("--allow-config-change", action="store_true",
                   help="passed to the trainer: resume even if fields other than the safe ones changed")
    m = p.add_argument_group("multi-node (run the same command on every node, each with its --node-rank)")
    m.add_argument("--nodes", type=int, default=1, help="machines in the job")
    m.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0 .. nodes-1")
    m.add_argument("--main-address", help="address of node 0 (needed when --nodes > 1)")
    m.add_argument("--main-port", type=int, default=None,
                   help="rendezvous port on node 0 (default: a free port on one node, 29500 across nodes)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.epochs=10 optimizer.lr=3e-3")


def _default_nproc() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or not key or key.startswith("-"):
            raise SystemExit(f"graft: error: {o!r} is not a config override; write section.field=value "
                             f"(e.g. train.epochs=10)")


def _validate_config(config: str | Path, overrides: list[str]):
    """Read the run config now, so a typo fails in a second instead of after N processes start."""
    from graft.config import load_config

    try:
        return load_config(config, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"graft: error: {e}") from e


def _launch_options(args, cfg) -> LaunchOptions:
    strategy = args.strategy or ("fsdp" if cfg.train.strategy == "fsdp2" else "ddp")
    try:
        return LaunchOptions(
            nproc=args.nproc if args.nproc is not None else _default_nproc(),
            strategy=strategy, nodes=args.nodes, node_rank=args.node_rank,
            main_address=args.main_address, main_port=args.main_port, device=args.device,
            mixed_precision=args.mixed_precision or cfg.precision,
            accelerate_config=args.accelerate_config, deepspeed_config=args.ds_config, script=args.script)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"graft: error: {e}") from e


def _strategy_overrides(opts: LaunchOptions, cfg) -> list[str]:
    """FSDP2 without accelerate's plugin (the CPU case, under torchrun): the trainer learns from
    its config that it must call fully_shard itself. On GPUs accelerate's FSDP2 plugin wraps the
    model in prepare(); either way the trainer ends up with the same FSDPModule and state code."""
    if opts.strategy == "fsdp" and resolve_device(opts.device) == "cpu" and cfg.train.strategy != "fsdp2":
        return [FSDP_OVERRIDE]
    if opts.strategy != "fsdp" and cfg.train.strategy == "fsdp2":
        raise SystemExit(f"graft: error: the config says train.strategy: fsdp2 but --strategy {opts.strategy}; "
                         f"drop --strategy or add train.strategy=auto")
    return []


def _build(opts: LaunchOptions, script_args: list[str]) -> Command:
    try:
        return build_command(opts, script_args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"graft: error: {e}") from e


# ---------------------------------------------------------------------------------------- running

# Signals passed on to the launcher's process group. SIGUSR1 becomes SIGTERM: torchrun's agent
# dies on a signal it does not handle and leaves the workers behind; it forwards SIGTERM.
_FORWARD = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGTERM,
            signal.SIGHUP: signal.SIGTERM}


def execute(cmd: Command, *, dry_run: bool = False, drain_timeout: float = 120.0) -> int:
    """Print `cmd`, run it (unless dry_run), forward signals, return its exit code (128+N on signal N;
    2 when the trainer reported a one-line error, whatever the launcher made of it)."""
    for note in cmd.notes:
        print(f"# {note}")
    print(f"$ {cmd.shell()}", flush=True)
    if dry_run:
        return 0
    with tempfile.TemporaryDirectory(prefix="graft-launch-") as tmp:
        error_file = Path(tmp) / "error"
        env = {**cmd.full_env(), ENV_ERROR_FILE: str(error_file)}
        rc = _run(cmd.argv, env, drain_timeout)
        if rc != 0 and error_file.is_file():
            message = error_file.read_text()
            if "--quiet" not in cmd.argv:  # the launcher printed its own report after the trainer's line
                print(f"graft: error: {message}", file=sys.stderr)
            return 2
    return rc


def _run(argv: list[str], env: dict[str, str], drain_timeout: float) -> int:
    # Its own session, so a Ctrl-C reaches it once (from us), not twice (from the terminal too).
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    signalled: list[int] = []

    def forward(signum, _frame):
        signalled.append(signum)
        try:
            os.killpg(proc.pid, _FORWARD[signum])
        except ProcessLookupError:
            pass

    previous = {}
    for s in _FORWARD:
        try:
            previous[s] = signal.signal(s, forward)
        except ValueError:  # not the main thread: no forwarding, the child still runs
            break
    try:
        rc = proc.wait()
        if signalled:
            # A single-process `accelerate launch` dies on SIGTERM at once while the trainer it
            # started is still writing its preemption checkpoint: wait for the whole group.
            _wait_group(proc.pid, drain_timeout)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return rc if rc >= 0 else 128 - rc


def preflight(run_dir: str | Path, opts: LaunchOptions) -> None:
    """Refuse now (a RunDirError: `graft: error:`, exit 2) a run folder the trainer would refuse:
    unwritable, or locked by another trainer. Node 0 only (its rank 0 owns the folder); the
    trainer checks again itself, this only spares starting a launcher for nothing."""
    if opts.node_rank != 0:
        return
    from graft.checkpointing import faults, lock

    faults.check_writable(run_dir)
    lock.ensure_free(run_dir)


def _wait_group(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    _check_overrides(args.overrides)
    cfg = _validate_config(args.config, args.overrides)
    opts = _launch_options(args, cfg)
    script_args = ["--config", str(args.config)]
    if args.resume:
        script_args += ["--resume", args.resume]
    if args.allow_config_change:
        script_args.append("--allow-config-change")
    script_args += [*args.overrides, *_strategy_overrides(opts, cfg)]
    cmd = _build(opts, script_args)
    print(f"# run folder: {cfg.train.out_dir} ({opts.world_size} process(es), {opts.strategy}, "
          f"node {opts.node_rank} of {opts.nodes})")
    if not args.dry_run:
        preflight(cfg.train.out_dir, opts)
    return execute(cmd, dry_run=args.dry_run)


def resume_overrides(run_dir: Path, epochs: int | None, policy: str | None) -> list[str]:
    """What `graft resume` adds to the trainer's arguments: the run folder itself, and the extension."""
    out = [f"train.out_dir={run_dir}"]
    if epochs is not None:
        out.append(f"train.epochs={epochs}")
    if policy is not None:
        out.append(f"schedule.on_extend={policy}")
    return out


SAVED_STRATEGY = {"single": "ddp", "ddp": "ddp", "fsdp2": "fsdp"}


def saved_launch(run_dir) -> dict | None:
    """train_state.json of the run's newest complete checkpoint (world_size, strategy, zero_stage), if any."""
    from graft.checkpointing import layout

    try:
        # Sizes only: this picks the launch shape (a hint); the trainer picks the checkpoint itself,
        # hashes checked.
        folder, _ = layout.newest_complete(run_dir, hashes=False)
        if folder is None:
            return None
        state = json.loads((folder / layout.TRAIN_STATE).read_text())
    except (OSError, ValueError, GraftError):
        return None  # the trainer reports what is wrong with the folder, with more context
    return {**state, "_folder": folder.name} if isinstance(state, dict) else None


def cmd_resume(args) -> int:
    _check_overrides(args.overrides)
    from graft.storage import as_path

    run_dir = as_path(args.run_dir)  # a local folder or an s3:// prefix (its config.yaml is read from there)
    config = run_dir / RUN_CONFIG
    if not config.is_file():
        raise SystemExit(f"graft: error: {str(run_dir)!r} has no {RUN_CONFIG}: is it a run folder the trainer "
                         f"wrote (train.out_dir)? To start a new run use `graft train --config ...`")
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f"graft: error: --epochs {args.epochs}: must be >= 1")
    overrides = [*resume_overrides(run_dir, args.epochs, args.policy), *args.overrides]
    cfg = _validate_config(config, overrides)
    saved = saved_launch(run_dir)
    if saved:
        # By default the processes and strategy of the run that saved: bit-for-bit continuation
        # needs them. --nproc / --strategy may differ: the checkpoint is world-size-free.
        world, strategy = saved.get("world_size"), SAVED_STRATEGY.get(saved.get("strategy"))
        if saved.get("strategy") == "deepspeed":
            strategy = {1: "zero1", 2: "zero2", 3: "zero3"}.get(saved.get("zero_stage"))
        picked = []
        if args.nproc is None and isinstance(world, int) and world % args.nodes == 0:
            args.nproc = world // args.nodes
            picked.append(f"--nproc {args.nproc}")
        if args.strategy is None and strategy:
            args.strategy = strategy
            picked.append(f"--strategy {strategy}")
        if picked:
            print(f"# from the checkpoint {saved['_folder']}: {' '.join(picked)} "
                  f"({saved.get('strategy')} on {world} process(es))")
    opts = _launch_options(args, cfg)
    script_args = ["--config", str(config), "--resume", args.checkpoint or "auto",
                   *(["--allow-config-change"] if args.allow_config_change else []), *overrides,
                   *_strategy_overrides(opts, cfg)]
    cmd = _build(opts, script_args)
    what = f"to {args.epochs} epochs ({args.policy or cfg.schedule.on_extend})" if args.epochs else "where it stopped"
    print(f"# resuming {run_dir} {what}")
    if not args.dry_run:
        preflight(cfg.train.out_dir, opts)
    return execute(cmd, dry_run=args.dry_run)


def cmd_plot(args) -> int:
    from graft.launch.plot import plot_run

    try:
        res = plot_run(args.run_dir, args.output, smooth=args.smooth)
    except FileNotFoundError as e:
        raise SystemExit(f"graft: error: {e}") from e
    acc = f", final val accuracy {res.final_val_accuracy:.1%}" if res.final_val_accuracy is not None else ""
    marks = f", resumed at step(s) {res.resume_steps}" if res.resume_steps else ""
    print(f"wrote {res.path} ({res.n_steps} steps, {res.n_epochs} epochs{acc}{marks})")
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """Options and key=value overrides in any order: `graft resume RUN --epochs 4 a.b=1`.

    Plain argparse matches every positional at its first chance (RUN), so an override after
    an option would be "unrecognized"; intermixed parsing collects the positionals first.
    """

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back here, twice
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _intermixed(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # The subparsers action built `p` with the top-level parser's class; this subclass adds
    # only the method above, so switching the class of the instance is safe.
    p.__class__ = _IntermixedParser
    return p


def register(sub) -> None:
    p = sub.add_parser("train", help="start a training run (prints and runs the accelerate/torchrun command)",
                       description="Start the trainer (python -m graft.train) under accelerate launch "
                                   "(or torchrun for FSDP2 on CPU).")
    p.add_argument("--config", required=True, help="run config YAML, e.g. the run.yaml `graft init` writes")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the newest complete checkpoint or PATH")
    _add_launch_options(_intermixed(p))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run folder, optionally to more epochs",
                       description="Continue RUN_DIR from its newest complete checkpoint, with the resolved "
                                   "config it saved; --epochs extends a finished run.")
    p.add_argument("run_dir", help="the run folder (train.out_dir of the run)")
    p.add_argument("--epochs", type=int, help="new total epochs (extends the run; sets train.epochs)")
    p.add_argument("--policy", choices=("continue", "restart", "stretch"),
                   help="learning-rate schedule on extension (schedule.on_extend; default: the run's)")
    p.add_argument("--checkpoint", metavar="PATH", help="resume from this checkpoint instead of the newest")
    _add_launch_options(_intermixed(p))
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("plot", help="loss and accuracy curves of a run to PNG, resume points marked")
    p.add_argument("run_dir", help="run folder with metrics.jsonl (or the file itself)")
    p.add_argument("-o", "--output", help="PNG path (default: RUN_DIR/curves.png)")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA weight for the loss curve, 0 <= w < 1 (lowered when few points are logged)")
    p.set_defaults(func=cmd_plot)
