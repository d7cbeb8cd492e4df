"""Building the command that starts the trainer on one machine of a (possibly multi-node) job.

One place decides how each strategy is launched, so `graft train`, `graft resume`, the
Slurm example and the tests all agree:

| strategy      | GPU machine                                   | CPU-only machine                          |
|---------------|-----------------------------------------------|-------------------------------------------|
| ddp           | accelerate launch, accelerate/ddp.yaml        | same, plus ACCELERATE_USE_CPU=true (gloo) |
| fsdp          | accelerate launch, accelerate/fsdp2.yaml      | torchrun; the trainer calls fully_shard   |
| zero1 / zero2 / zero3 | accelerate launch, accelerate/deepspeed.yaml + deepspeed/zeroN.json | same (DeepSpeed picks gloo) |

The trainer is the packaged module `graft.train` (`-m graft.train`, which both accelerate
launch and torchrun accept), unless a script is named; the launcher configs are package data
under graft/launch/configs/. So an installed graft launches from any folder, with nothing
copied from the repository.

Why the CPU column differs (all seen on the project's machines, see shared/ENVIRONMENT.md):
accelerate's `--cpu` and MULTI_CPU configs want mpirun and silently start ONE process;
`--multi_gpu` starts N processes but each sees a world of 1 unless the Accelerator runs on
the CPU, which ACCELERATE_USE_CPU=true (read by accelerate's AcceleratorState) asks for;
and accelerate enables its FSDP plugin only for GPU-like devices, falling back to DDP or to
no wrapping without an error, so FSDP2 on CPU has to be torch's `fully_shard` under torchrun.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Package data (pyproject.toml [tool.setuptools.package-data]). A wheel installs unzipped, so these
# are real files whose paths the launchers can be given.
CONFIGS = Path(__file__).resolve().parent / "configs"
# The trainer that ships in the package; started as a module, so no file path is needed.
TRAINER_MODULE = "graft.train"

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
ZERO = ("zero1", "zero2", "zero3")
DEVICES = ("auto", "cpu", "gpu")
MIXED_PRECISION = ("no", "fp16", "bf16")

ACCELERATE_CONFIGS = {
    "single": CONFIGS / "accelerate" / "single.yaml",
    "ddp": CONFIGS / "accelerate" / "ddp.yaml",
    "fsdp": CONFIGS / "accelerate" / "fsdp2.yaml",
    "zero1": CONFIGS / "accelerate" / "deepspeed.yaml",
    "zero2": CONFIGS / "accelerate" / "deepspeed.yaml",
    "zero3": CONFIGS / "accelerate" / "deepspeed.yaml",
}
DEEPSPEED_CONFIGS = {
    "zero1": CONFIGS / "deepspeed" / "zero1.json",
    "zero2": CONFIGS / "deepspeed" / "zero2.json",
    "zero3": CONFIGS / "deepspeed" / "zero3.json",
}

# What the launched script can read to learn how it was started (informational: this
# repo's trainer learns about FSDP2 from train.strategy=fsdp2, which `graft train` adds).
DEFAULT_PORT = 29500
ENV_STRATEGY = "GRAFT_STRATEGY"
ENV_DEVICE = "GRAFT_DEVICE"
# Where train.py writes its one-line error (a GraftError, exit 2): launchers report a failed
# worker as exit 1 with their own traceback, so `graft train` reads the trainer's verdict here.
ENV_ERROR_FILE = "GRAFT_ERROR_FILE"


@dataclass(kw_only=True)
class LaunchOptions:
    """How to start the training script on this machine."""

    nproc: int = 1
    """Processes on this machine (one per GPU; on a CPU-only machine, CPU processes)."""
    strategy: str = "ddp"
    """ddp | fsdp (FSDP2) | zero1 | zero2 | zero3 (DeepSpeed ZeRO stage 1, 2 or 3)."""
    nodes: int = 1
    """Machines in the job; each runs this same command with its own node_rank."""
    node_rank: int = 0
    """This machine's rank among the nodes (0 is the one at main_address)."""
    main_address: str | None = None
    """Address of node 0, which every node reaches for the rendezvous (required if nodes > 1)."""
    main_port: int | None = None
    """TCP port on node 0 for the rendezvous (None: a free port on one node, 29500 across nodes)."""
    device: str = "auto"
    """auto (GPU when torch sees one) | cpu | gpu."""
    mixed_precision: str = "no"
    """no | fp16 | bf16, passed to accelerate (the run config's precision section may say more)."""
    accelerate_config: str | None = None
    """An accelerate YAML to use instead of the strategy's one from the packaged configs/accelerate/."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON to use instead of the packaged configs/deepspeed/zeroN.json (zero1/zero2/zero3 only)."""
    script: str | None = None
    """A training script to start instead of the packaged trainer `python -m graft.train` (None)."""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
        if self.nproc < 1:
            raise ValueError(f"nproc={self.nproc}: need at least 1 process per node")
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes}: need at least 1 node")
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"node_rank={self.node_rank} is outside 0..{self.nodes - 1} (nodes={self.nodes})")
        if self.nodes > 1 and not self.main_address:
            raise ValueError(f"nodes={self.nodes}: every node needs main_address, the address of node 0 "
                             "(under Slurm: the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`)")
        if self.main_port is not None and not 1 <= self.main_port <= 65535:
            raise ValueError(f"main_port={self.main_port} is not a TCP port")
        if self.deepspeed_config and self.strategy not in ZERO:
            raise ValueError(f"deepspeed_config={self.deepspeed_config!r} needs strategy zero1, zero2 or zero3, "
                             f"not {self.strategy!r}")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nodes


@dataclass
class Command:
    """A command line plus the environment variables it needs, printable as one shell line."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Why the command looks the way it does (printed above it)."""

    def shell(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv)

    def __str__(self) -> str:
        return self.shell()

    def full_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        return env


def resolve_device(device: str) -> str:
    """`auto` -> "gpu" when torch sees a CUDA device, else "cpu"."""
    if device != "auto":
        return device
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def free_port() -> int:
    """A TCP port nobody listens on now (a second job on the same machine must not clash on 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port(opts: LaunchOptions) -> int:
    if opts.main_port is not None:
        return opts.main_port
    # Every node must agree on the port, so only a one-node job may pick one by itself.
    return DEFAULT_PORT if opts.nodes > 1 else free_port()


def _tool(name: str, module: str) -> list[str]:
    """The launcher of THIS interpreter: its console script when the environment has one (shorter
    printed commands), else `python -m module`. Never one found on PATH: that may belong to another
    environment, whose Python would then import another graft (or none)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return [str(local)]
    return [sys.executable, "-m", module]


def _pretty(path: Path | str) -> str:
    """A path relative to the working folder when it is inside it (shorter printed commands)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _entry(script: str | None) -> list[str]:
    """What the launcher starts: `-m graft.train` (the packaged trainer), or the script given."""
    if script is None:
        return ["-m", TRAINER_MODULE]
    p = Path(script)
    if not p.is_file():
        raise FileNotFoundError(f"training script {script!r} not found (from {Path.cwd()}); leave --script out to "
                                f"run the packaged trainer, python -m {TRAINER_MODULE}")
    return [_pretty(p)]


def _entry_note(script: str | None, entry: list[str]) -> str:
    if script is not None:
        return f"entry: {entry[0]}"
    note = f"entry: python -m {TRAINER_MODULE} (the packaged trainer)"
    if Path("train.py").is_file():
        # e.g. the own-loop train.py that `graft init` writes: it is the user's to start, not ours.
        note += "; ./train.py is not started (--script train.py would start it instead)"
    return note


def _existing(path: str | Path, what: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    return _pretty(path)


def torchrun_argv(opts: LaunchOptions, script_args: list[str] = ()) -> list[str]:
    """`torchrun` starting the trainer (or `opts.script`) with `script_args` on `opts.nproc` processes
    of node `opts.node_rank`: how `build_command` launches FSDP on a CPU-only machine, and the one
    torchrun line for anything else that only needs N processes of a script (the tests' scripts).
    Only the sizes and the rendezvous of `opts` apply here (not strategy, device or configs)."""
    return [*_tool("torchrun", "torch.distributed.run"), "--nproc_per_node", str(opts.nproc),
            "--nnodes", str(opts.nodes), "--node_rank", str(opts.node_rank),
            "--master_addr", opts.main_address or "127.0.0.1", "--master_port", str(_port(opts)),
            *_entry(opts.script), *script_args]


def build_command(opts: LaunchOptions, script_args: list[str] = ()) -> Command:
    """The command that starts the trainer (or `opts.script`) with `script_args` on this machine
    (node `opts.node_rank`). Its notes say which entry and which launcher configs it uses."""
    device = resolve_device(opts.device)
    entry = _entry(opts.script)
    env = {ENV_STRATEGY: opts.strategy, ENV_DEVICE: device}
    notes = [_entry_note(opts.script, entry)]

    if opts.strategy == "fsdp" and device == "cpu":
        notes.append("fsdp on CPU: accelerate's FSDP plugin does nothing without a GPU, so the trainer runs "
                     "under torchrun and wraps the model with torch's fully_shard itself (train.strategy=fsdp2)")
        return Command(torchrun_argv(opts, script_args), env, notes)

    deepspeed = opts.strategy in ZERO
    single = opts.world_size == 1 and not deepspeed
    cfg_key = "single" if single and opts.strategy == "ddp" else opts.strategy
    if single and opts.strategy == "fsdp":
        notes.append("fsdp with one process: FSDP2 over a world of 1 (no sharding; same code path)")
    accel_cfg = _existing(opts.accelerate_config or ACCELERATE_CONFIGS[cfg_key], "accelerate config")

    notes.append(f"accelerate config: {accel_cfg}")
    argv = [*_tool("accelerate", "accelerate.commands.accelerate_cli"), "launch", "--config_file", accel_cfg]
    if single:
        # Without it accelerate's one-process launcher answers the trainer's exit 2 (a one-line
        # user error) with a CalledProcessError traceback of its own.
        argv.append("--quiet")
    if opts.strategy == "ddp" and not single:
        argv.append("--multi_gpu")
    elif opts.strategy == "fsdp":
        argv += ["--use_fsdp", "--fsdp_version", "2"]
    elif deepspeed:
        ds_cfg = _existing(opts.deepspeed_config or DEEPSPEED_CONFIGS[opts.strategy], "DeepSpeed config")
        notes.append(f"DeepSpeed config: {ds_cfg}")
        argv += ["--use_deepspeed", "--deepspeed_config_file", ds_cfg]
        if opts.nodes > 1:
            # One launcher per machine (srun starts them), not DeepSpeed's pdsh over ssh.
            argv += ["--deepspeed_multinode_launcher", "standard"]
    argv += ["--num_processes", str(opts.world_size), "--num_machines", str(opts.nodes),
             "--mixed_precision", opts.mixed_precision, "--dynamo_backend", "no"]
    if opts.nodes > 1:
        argv += ["--machine_rank", str(opts.node_rank), "--main_process_ip", opts.main_address,
                 "--main_process_port", str(_port(opts))]
    elif not single:
        argv += ["--main_process_port", str(_port(opts))]

    if device == "cpu" and opts.strategy == "ddp" and not single:
        # Without it each process builds a GPU-less Accelerator that sees a world of 1.
        env["ACCELERATE_USE_CPU"] = "true"
        notes.append("ddp on CPU: ACCELERATE_USE_CPU=true makes accelerate run MULTI_CPU over gloo")
    if device == "cpu" and deepspeed:
        # Not ACCELERATE_USE_CPU here: accelerate turns DeepSpeed off when it is set.
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
        notes.append("DeepSpeed on CPU: DS_ACCELERATOR=cpu, gloo process group (no GPU needed)")
    argv += [*entry, *script_args]
    return Command(argv, env, notes)
