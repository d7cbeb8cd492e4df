"""Shared bits of the trainer tests: a tiny run config, and what two runs are compared on."""

from __future__ import annotations

import json
from pathlib import Path

from graft.config import load_config

# tiny_vgg on 32x32 digits, a few hundred samples, a few steps per epoch: seconds per run.
TINY = [
    "model.factory=graft.models:tiny_vgg",
    "data.limit=240", "data.batch_size=16", "data.val_fraction=0.25",
    "optimizer.lr=0.003", "schedule.name=cosine", "schedule.warmup_steps=3", "schedule.min_lr_ratio=0.1",
    "train.max_steps_per_epoch=4", "train.save_every=1", "train.keep_last=null", "train.log_every=1",
    "train.progress=false", "train.seed=3",
]


def tiny_overrides(out_dir, *extra: str) -> list[str]:
    return [*TINY, f"train.out_dir={out_dir}", *extra]


def tiny_config(out_dir, *extra: str):
    return load_config(None, tiny_overrides(out_dir, *extra))


def metrics(run_dir) -> list[dict]:
    """Every record of RUN_DIR/metrics.jsonl, in the order written (the one parser of the tests)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def events(run_dir, kind: str) -> list[dict]:
    """The records of one event ("step", "epoch", "save", "resume", ...), in the order written."""
    return [d for d in metrics(run_dir) if d["event"] == kind]


def step_lines(run_dir) -> dict[int, dict]:
    """The last 'step' line of each step in RUN_DIR/metrics.jsonl (a resumed run repeats lost steps)."""
    return {d["step"]: d for d in events(run_dir, "step")}


def logical_state(folder) -> dict:
    """What must be bitwise equal between two runs, read independently of graft's restorer (the
    `safetensors` package opens every rank's shard; pieces are joined by the manifest's ranges):
    every logical tensor of the model and the optimizer, the optimizer's param groups (state.json)
    and the schedule state, and any adapter's rank-private state.
    RNG states are left out (as before sharded checkpoints: they are not training state)."""
    import torch
    from safetensors import safe_open

    from graft.checkpointing import layout

    folder = Path(folder)
    manifest = json.loads((folder / layout.MANIFEST).read_text())
    pieces: dict[str, dict] = {}
    for rel in manifest["files"]:
        if rel.endswith(".safetensors"):
            with safe_open(str(folder / rel), "pt") as f:
                for key in f.keys():
                    name, _, rng = key.rpartition("[")
                    start, stop = (int(x) for x in rng.rstrip("]").split(":"))
                    pieces.setdefault(name, {})[start] = (stop, f.get_tensor(key))
    out = {}
    for name, t in manifest["tensors"].items():
        if name.startswith(layout.RANK_PREFIX) and "/rng/" in name:
            continue
        flat = torch.cat([v for _, (_, v) in sorted(pieces.get(name, {}).items())]) if pieces.get(name) else \
            torch.empty(0, dtype=getattr(torch, t["dtype"]))
        out[name] = flat.reshape(t["shape"])
    state = json.loads((folder / layout.STATE).read_text())
    out["state.json:adapter"] = state["adapter"]
    engine = [r["adapter"] for r in state["ranks"] if r.get("adapter") is not None]
    if engine:
        out["state.json:ranks.adapter"] = engine
    out["scheduler.json"] = json.loads((folder / layout.SCHEDULE).read_text())
    return out


def bitwise_equal(x, y) -> bool:
    """Same bytes (so -0.0 differs from 0.0 and equal NaNs are equal), same dtype and shape."""
    import torch

    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def state_differences(a, b) -> list[str]:
    """Names whose values (or dtypes, shapes) differ between two checkpoints' logical_state; [] if equal."""
    import torch

    sa, sb = logical_state(a), logical_state(b)
    differ = sorted(set(sa) ^ set(sb))
    for k in sorted(set(sa) & set(sb)):
        x, y = sa[k], sb[k]
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not bitwise_equal(x, y):
                differ.append(k)
        elif x != y:
            differ.append(k)
    return differ


def elastic_plan(*steps) -> str:
    """The plan argument of tests/distributed/scripts/elastic.py: its steps as one JSON list."""
    return json.dumps(list(steps))


def assert_elastic_check(r: dict, world: int, strategy: str) -> None:
    """What a "check" step of elastic.py must show: resumed at `world` under `strategy` from the
    saved epoch 2, every logical tensor, the param groups and the schedule bitwise the saved ones,
    the derived RNG policy, and two more epochs whose losses keep falling."""
    assert (r["world_size"], r["strategy"]) == (world, strategy)
    assert r["saved"] == "epoch_000002" and r["summary"]["resumed_from"].endswith("epoch_000002")
    assert r["differ"] == [], r["differ"]
    assert r["tensors"] > 60  # weights and AdamW state (exp_avg, exp_avg_sq, step) of every parameter
    assert r["summary"]["rng_policy"] == "derived" and r["summary"]["finished"]
    before, after = r["losses_before"], r["losses_after"]
    assert sorted(after) == ["3", "4"]
    assert after["4"] < after["3"] < before["2"], (before, after)


def run_and_sigterm(cmd: list[str], ready, *, poll: float, timeout: float = 240) -> str:
    """Start `cmd` (from the repository, the tests' child environment, this process's thread count),
    send it SIGTERM once `ready()` holds, and return its output; it must exit 0 saying it was preempted."""
    import signal
    import subprocess
    import time

    import torch

    import launch

    env = launch.child_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(cmd, env=env, cwd=launch.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(poll)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    assert "preempted" in output
    return output


def kill_savers_at_random(target, run_dir, store, world: int, last: int, rnd, *,
                          before: tuple[float, float], gap: float) -> int:
    """One kill -9 trial: fork `world` ranks running target(run_dir, store, rank, pipe), which say
    "ready" once their group is up, receive `last` (the newest checkpoint known committed), then
    save until killed. After a random `before` delay every rank is SIGKILLed, in random order,
    the first up to `gap` seconds ahead of the rest. Returns the newest checkpoint rank 0
    reported committed (`last` if none)."""
    import multiprocessing
    import os
    import signal
    import time

    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(world)]
    procs = [ctx.Process(target=target, args=(run_dir, store, r, pipes[r][1]), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    for parent, _ in pipes:  # the group is up: from here on the ranks only save
        assert parent.poll(60) and parent.recv() == "ready"
    for parent, _ in pipes:
        parent.send(last)
    time.sleep(rnd.uniform(*before))
    order = rnd.sample(procs, world)
    os.kill(order[0].pid, signal.SIGKILL)
    time.sleep(rnd.uniform(0, gap))
    for p in order[1:]:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join(10)
    while pipes[0][0].poll():
        last = max(last, pipes[0][0].recv())
    return last
