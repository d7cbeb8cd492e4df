"""The launch command builder (every strategy, CPU and GPU, multi-node) and `graft train/resume --dry-run`.

Nothing here starts a process: `execute` running commands and passing signals on is tested in
tests/e2e/test_execute.py, `python -m graft.train` in tests/e2e/test_console.py."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from graft.launch import train_cmd
from graft.launch.cli import main as graft_main
from graft.launch.commands import (
    ACCELERATE_CONFIGS,
    CONFIGS,
    DEEPSPEED_CONFIGS,
    TRAINER_MODULE,
    Command,
    LaunchOptions,
    build_command,
    torchrun_argv,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "tests/unit/test_launch.py"  # any existing file stands in for a user's script (the tests run in REPO)


def opts(**kw) -> LaunchOptions:
    kw.setdefault("script", SCRIPT)
    kw.setdefault("device", "cpu")
    return LaunchOptions(**kw)


def flag(argv: list[str], name: str) -> str:
    """The value following `name` in argv."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def same_file(printed: str, expected: Path) -> bool:
    """A path as the command prints it (relative to the working folder when inside it) is `expected`."""
    return Path(printed).resolve() == expected.resolve()


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


# ------------------------------------------------------------------------------- single node

def test_single_process_uses_plain_accelerate_config():
    cmd = build_command(opts(nproc=1), ["--config", "c.yaml"])
    assert Path(cmd.argv[0]).name == "accelerate" and cmd.argv[1] == "launch"
    assert same_file(flag(cmd.argv, "--config_file"), ACCELERATE_CONFIGS["single"])
    assert "--multi_gpu" not in cmd.argv  # accelerate refuses --multi_gpu with one process
    assert flag(cmd.argv, "--num_processes") == "1"
    assert cmd.argv[-3:] == [SCRIPT, "--config", "c.yaml"]


def test_ddp_cpu_is_the_recipe_that_works_on_cpu():
    cmd = build_command(opts(nproc=2, main_port=12345), ["a.b=1"])
    a = cmd.argv
    assert same_file(flag(a, "--config_file"), CONFIGS / "accelerate" / "ddp.yaml")
    assert "--multi_gpu" in a and "--cpu" not in a  # --cpu silently runs ONE process (it wants mpirun)
    assert flag(a, "--num_processes") == "2" and flag(a, "--num_machines") == "1"
    assert flag(a, "--mixed_precision") == "no" and flag(a, "--dynamo_backend") == "no"
    assert flag(a, "--main_process_port") == "12345"
    assert cmd.env["ACCELERATE_USE_CPU"] == "true"  # else each process sees a world of 1
    assert cmd.env["GRAFT_DEVICE"] == "cpu" and cmd.env["GRAFT_STRATEGY"] == "ddp"
    assert a[-2:] == [SCRIPT, "a.b=1"]


def test_ddp_gpu_has_no_cpu_switch():
    cmd = build_command(opts(nproc=8, device="gpu", mixed_precision="bf16"))
    assert "ACCELERATE_USE_CPU" not in cmd.env
    assert "--multi_gpu" in cmd.argv and flag(cmd.argv, "--mixed_precision") == "bf16"


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed(stage):
    cmd = build_command(opts(nproc=2, strategy=stage))
    a = cmd.argv
    assert "--use_deepspeed" in a and "--multi_gpu" not in a  # accelerate allows only one of them
    assert same_file(flag(a, "--config_file"), CONFIGS / "accelerate" / "deepspeed.yaml")
    assert same_file(flag(a, "--deepspeed_config_file"), CONFIGS / "deepspeed" / f"{stage}.json")
    # accelerate turns DeepSpeed off when ACCELERATE_USE_CPU is set
    assert "ACCELERATE_USE_CPU" not in cmd.env and cmd.env["DS_ACCELERATOR"] == "cpu"
    assert "--deepspeed_multinode_launcher" not in a


def test_deepspeed_custom_json_and_single_process(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    cmd = build_command(opts(nproc=1, strategy="zero2", deepspeed_config=str(ds)))
    assert flag(cmd.argv, "--deepspeed_config_file") == str(ds)
    assert "--use_deepspeed" in cmd.argv  # one rank still gets the engine


def test_fsdp_on_cpu_is_torchrun():
    cmd = build_command(opts(nproc=2, strategy="fsdp", main_port=2222), ["x=1"])
    a = cmd.argv
    assert Path(a[0]).name == "torchrun"
    assert flag(a, "--nproc_per_node") == "2" and flag(a, "--nnodes") == "1"
    assert flag(a, "--master_addr") == "127.0.0.1" and flag(a, "--master_port") == "2222"
    assert a[-2:] == [SCRIPT, "x=1"]
    assert any("fully_shard" in n for n in cmd.notes)
    # The one torchrun line: the tests start their N-process scripts with torchrun_argv too.
    assert a == torchrun_argv(opts(nproc=2, strategy="fsdp", main_port=2222), ["x=1"])


def test_fsdp_on_gpu_is_accelerate_fsdp2():
    cmd = build_command(opts(nproc=4, strategy="fsdp", device="gpu"))
    a = cmd.argv
    assert a[1] == "launch" and "--use_fsdp" in a and flag(a, "--fsdp_version") == "2"
    assert same_file(flag(a, "--config_file"), CONFIGS / "accelerate" / "fsdp2.yaml")


def test_accelerate_config_override(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("compute_environment: LOCAL_MACHINE\n")
    cmd = build_command(opts(nproc=2, accelerate_config=str(y)))
    assert flag(cmd.argv, "--config_file") == str(y)


def test_launcher_configs_are_valid():
    import json

    import yaml

    # Package data, inside graft/ (an installed wheel has them there too: tests/e2e/test_installed.py).
    assert CONFIGS == Path(__import__("graft").__file__).parent / "launch" / "configs"
    for name in ("single", "ddp", "fsdp2", "deepspeed"):
        cfg = yaml.safe_load((CONFIGS / "accelerate" / f"{name}.yaml").read_text())
        assert cfg["compute_environment"] == "LOCAL_MACHINE"
    assert set(ACCELERATE_CONFIGS.values()) == set((CONFIGS / "accelerate").glob("*.yaml"))
    assert yaml.safe_load((CONFIGS / "accelerate/fsdp2.yaml").read_text())["fsdp_config"]["fsdp_version"] == 2
    for stage in (1, 2, 3):
        ds = json.loads(DEEPSPEED_CONFIGS[f"zero{stage}"].read_text())
        assert ds["zero_optimization"]["stage"] == stage


# ------------------------------------------------------------------------------- the entry

@pytest.mark.parametrize("kw", [dict(nproc=1), dict(nproc=2), dict(nproc=2, strategy="zero2"),
                                dict(nproc=2, strategy="fsdp"), dict(nproc=4, strategy="fsdp", device="gpu")])
def test_default_entry_is_the_packaged_trainer(kw):
    """No script named: `-m graft.train` (accelerate launch and torchrun both take -m), from any folder."""
    cmd = build_command(LaunchOptions(**{"device": "cpu", **kw}), ["--config", "c.yaml"])
    a = cmd.argv
    assert a[-4:] == ["-m", TRAINER_MODULE, "--config", "c.yaml"]
    assert cmd.notes[0].startswith(f"entry: python -m {TRAINER_MODULE} (the packaged trainer)")
    if Path(a[0]).name != "torchrun":
        assert any(n == f"accelerate config: {flag(a, '--config_file')}" for n in cmd.notes)
    if "--deepspeed_config_file" in a:
        assert f"DeepSpeed config: {flag(a, '--deepspeed_config_file')}" in cmd.notes


def test_a_train_py_in_the_folder_is_not_started_unless_named(tmp_path, monkeypatch):
    """`graft init` writes the user's own-loop train.py: `graft train` still starts graft's trainer,
    says so, and starts the file only when --script names it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    cmd = build_command(LaunchOptions(device="cpu"))
    assert cmd.argv[-2:] == ["-m", TRAINER_MODULE] and "--script train.py" in cmd.notes[0]
    cmd = build_command(LaunchOptions(device="cpu", script="train.py"), ["x=1"])
    assert cmd.argv[-2:] == ["train.py", "x=1"] and cmd.notes[0] == "entry: train.py"


# ------------------------------------------------------------------------------- multi-node

def test_multinode_ddp_args():
    cmd = build_command(opts(nproc=4, nodes=3, node_rank=2, main_address="10.1.2.3", main_port=29600,
                             device="gpu"))
    a = cmd.argv
    assert flag(a, "--num_processes") == "12"  # accelerate counts processes over ALL machines
    assert flag(a, "--num_machines") == "3" and flag(a, "--machine_rank") == "2"
    assert flag(a, "--main_process_ip") == "10.1.2.3" and flag(a, "--main_process_port") == "29600"


def test_multinode_deepspeed_uses_one_launcher_per_node():
    cmd = build_command(opts(nproc=2, strategy="zero3", nodes=2, node_rank=1, main_address="n0"))
    assert flag(cmd.argv, "--deepspeed_multinode_launcher") == "standard"  # not pdsh over ssh


def test_multinode_fsdp_cpu_torchrun():
    cmd = build_command(opts(nproc=2, strategy="fsdp", nodes=2, node_rank=1, main_address="n0", main_port=4000))
    a = cmd.argv
    assert flag(a, "--nnodes") == "2" and flag(a, "--node_rank") == "1"
    assert flag(a, "--master_addr") == "n0" and flag(a, "--master_port") == "4000"


@pytest.mark.parametrize("kw, needle", [
    (dict(nodes=2), "main_address"),
    (dict(nodes=2, node_rank=2, main_address="a"), "node_rank"),
    (dict(strategy="horovod"), "strategy"),
    (dict(nproc=0), "nproc"),
    (dict(device="tpu"), "device"),
    (dict(deepspeed_config="x.json"), "zero2 or zero3"),
    (dict(main_port=70000), "port"),
])
def test_bad_options_say_what(kw, needle):
    with pytest.raises(ValueError, match=needle):
        opts(**kw)


def test_missing_script_says_where():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        build_command(LaunchOptions(script="nope.py", device="cpu"))


# ------------------------------------------------------------------------------- printing

def test_shell_line_round_trips():
    cmd = Command(["accelerate", "launch", "train.py", "init.rename=[['^a', 'b c']]"], {"A": "1 2"})
    line = cmd.shell()
    assert line.startswith("A='1 2' accelerate launch")
    assert shlex.split(line)[1:] == cmd.argv


def test_execute_dry_run_runs_nothing(capsys, tmp_path):
    marker = tmp_path / "ran"
    cmd = Command([sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    assert train_cmd.execute(cmd, dry_run=True) == 0
    assert not marker.exists()
    assert "$ " in capsys.readouterr().out


# ------------------------------------------------------------------------------- the CLI

@pytest.fixture
def run_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"train:\n  epochs: 2\n  out_dir: {tmp_path / 'run'}\n")
    return cfg


def _dry(capsys, *argv) -> tuple[int, list[str], str]:
    rc = graft_main(list(argv))
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("$ "))
    return rc, shlex.split(line[2:]), out


def test_graft_train_dry_run(capsys, run_config):
    rc, argv, out = _dry(capsys, "train", "--config", str(run_config), "--nproc", "2", "--device", "cpu",
                         "--main-port", "29999", "--dry-run", "train.epochs=4")
    assert rc == 0
    assert "ACCELERATE_USE_CPU=true" in argv and "--multi_gpu" in argv
    i = argv.index("-m")
    assert argv[i:] == ["-m", "graft.train", "--config", str(run_config), "train.epochs=4"]
    assert f"run folder: {run_config.parent / 'run'}" in out
    # which entry and which launcher configs, printed above the command
    assert "# entry: python -m graft.train (the packaged trainer)" in out
    assert f"# accelerate config: {flag(argv, '--config_file')}" in out


def test_graft_train_script_option(capsys, run_config):
    rc, argv, out = _dry(capsys, "train", "--config", str(run_config), "--nproc", "1", "--device", "cpu",
                         "--script", SCRIPT, "--dry-run")
    assert rc == 0 and argv[-3:] == [SCRIPT, "--config", str(run_config)] and f"# entry: {SCRIPT}" in out
    with pytest.raises(SystemExit, match="nope.py"):
        graft_main(["train", "--config", str(run_config), "--device", "cpu", "--script", "nope.py", "--dry-run"])


def test_graft_train_fsdp_tells_the_trainer(capsys, run_config):
    rc, argv, _ = _dry(capsys, "train", "--config", str(run_config), "--nproc", "2", "--strategy", "fsdp",
                       "--device", "cpu", "--dry-run")
    assert Path(argv[argv.index("GRAFT_DEVICE=cpu") + 1]).name == "torchrun"
    assert argv[-1] == "train.strategy=fsdp2"


def test_graft_train_rejects_bad_config_before_launching(capsys, run_config):
    with pytest.raises(SystemExit, match="unknown config key"):
        graft_main(["train", "--config", str(run_config), "--dry-run", "--device", "cpu", "nope.x=1"])
    with pytest.raises(SystemExit, match="not a config override"):
        graft_main(["train", "--config", str(run_config), "--dry-run", "--device", "cpu", "epochs"])


def test_graft_resume_dry_run_reads_the_run_folder(capsys, tmp_path, run_config):
    from graft.config import load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config(run_config).to_yaml())
    # overrides may sit between the options (intermixed parsing)
    rc, argv, out = _dry(capsys, "resume", str(run_dir), "--epochs", "4", "train.log_every=1", "--policy", "restart",
                         "--nproc", "1", "--device", "cpu", "--dry-run")
    assert rc == 0
    tail = argv[argv.index("-m"):]
    assert tail[:6] == ["-m", "graft.train", "--config", str(run_dir / "config.yaml"), "--resume", "auto"]
    assert {f"train.out_dir={run_dir}", "train.epochs=4", "schedule.on_extend=restart", "train.log_every=1"} <= set(tail)
    assert "to 4 epochs (restart)" in out


def test_graft_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(SystemExit, match="no config.yaml"):
        graft_main(["resume", str(tmp_path), "--dry-run"])


def _fake_checkpoint(run_dir: Path, name: str, train_state: dict) -> None:
    """A folder that passes the completeness check (manifest with sizes) without any training."""
    import json

    folder = run_dir / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "train_state.json").write_text(json.dumps(train_state))
    files = {p.name: {"size": p.stat().st_size, "sha256": ""} for p in folder.iterdir()}
    (folder / "manifest.json").write_text(json.dumps({"format": "graft-run-checkpoint", "version": 1,
                                                      "files": files}))


@pytest.mark.parametrize("saved, expect", [
    ({"world_size": 2, "strategy": "deepspeed", "zero_stage": 3}, ("zero3", "2")),
    ({"world_size": 4, "strategy": "ddp", "zero_stage": 0}, ("ddp", "4")),
])
def test_graft_resume_defaults_to_the_saved_launch(capsys, tmp_path, run_config, saved, expect):
    from graft.config import load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config(run_config).to_yaml())
    _fake_checkpoint(run_dir, "epoch_000002", {"epoch": 2, "step": 8, **saved})
    rc, argv, out = _dry(capsys, "resume", str(run_dir), "--device", "cpu", "--dry-run")
    assert rc == 0 and "from the checkpoint epoch_000002" in out
    strategy, n = expect
    assert argv[argv.index("--num_processes") + 1] == n
    if strategy == "zero3":
        assert same_file(argv[argv.index("--deepspeed_config_file") + 1], DEEPSPEED_CONFIGS["zero3"])
    # explicit options win
    rc, argv, _ = _dry(capsys, "resume", str(run_dir), "--device", "cpu", "--dry-run", "--nproc", "1",
                       "--strategy", "ddp")
    assert argv[argv.index("--num_processes") + 1] == "1" and "--use_deepspeed" not in argv


def test_port_defaults():
    one = build_command(opts(nproc=2))
    assert int(flag(one.argv, "--main_process_port")) > 0  # a free one, not a fixed 29500 that may clash
    many = build_command(opts(nproc=2, nodes=2, node_rank=1, main_address="n0"))
    assert flag(many.argv, "--main_process_port") == "29500"  # every node must compute the same
