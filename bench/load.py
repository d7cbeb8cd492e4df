#!/usr/bin/env python
"""Loading benchmark: graft against the usual ways, and against the machine's floor.

Every measurement runs in a fresh process (forked from an idle server that has only
imported the libraries, so each run pays no import time but inherits no loaded state;
`--spawn` starts a brand-new interpreter per run instead). Each process builds the model
(same shapes for every method, weights already written so its pages exist), then times
ONE load while a thread samples /proc/self/status:

  wall      seconds of the load call alone (not the model build, not the imports)
  +anon     peak RssAnon during the load minus RssAnon after the model was built
  +file     the same for RssFile (pages of mmap-ed checkpoint files)
  read      /proc/self/io read_bytes delta: bytes this process made the kernel fetch from
            storage (0 when the file is already in the page cache)

Scenarios (each about --gb GB of fp32 Linear layers):
  pth          one torch.save file, the model takes every key
  safetensors  one .safetensors file, the model takes every key
  index        a 4-shard Hugging Face index (model.safetensors.index.json); the CHANGED
               model keeps half of the layers (interleaved, so every shard is read with
               holes), renames a quarter of the checkpoint's layers (layers.N -> blocks.N)
               and has new modules (head, norm)
States: warm (every file read once before the run) and cold (posix_fadvise DONTNEED on
every file first).

Methods:
  graft         graft.load(model, path, verbose=False, progress=False[, rename=...])
  torch.load    torch.load(weights_only=True) + keep the keys with matching shapes +
                load_state_dict(strict=False): the hand-written way (pth)
  torch.mmap    the same with torch.load(mmap=True) (pth)
  st.load_file  safetensors.torch.load_file per file + the same filter (safetensors, index)
  st.safe_open  safetensors.safe_open, get_tensor only the kept keys, copy_ each into its
                parameter: the careful hand-written way (safetensors, index)
  accelerate    accelerate.utils.load_checkpoint_in_model(model, file or index)
  floor         the kept bytes pread straight into the parameters' own memory, in file
                order, offsets from the safetensors header / graft's reader spans, with
                POSIX_FADV_SEQUENTIAL as `cat` uses (measured here 3-4x faster cold than no
                hint), ONE reader; the machine's floor for a plain read loop, not a peer.
                It ignores what read-ahead costs past a kept range, so on the filtered
                scenario it reads more than it keeps. graft reads a dense file with two
                streams, so cold it can come in under this floor (x floor < 1).

Run:  .venv/bin/python bench/load.py            (~2 GB, 3 runs each, 12-14 minutes here)
      .venv/bin/python bench/load.py --quick    (0.25 GB, 1 run each, for development)
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

from procstats import PeakRss, drop_cache, read_bytes, run_in_child, status_kb, warm_cache

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1 << 20
BUCKET_BYTES = 64 * MB  # graft's default bucket: the memory target is one bucket + 10%
SCENARIOS = ("pth", "safetensors", "index")
STATES = ("warm", "cold")
PEERS = {
    "pth": ("torch.load", "torch.mmap", "accelerate"),
    "safetensors": ("st.load_file", "st.safe_open", "accelerate"),
    "index": ("st.load_file", "st.safe_open", "accelerate"),
}
N_SHARDS = 4


# ---------------------------------------------------------------------------------------
# The model and the checkpoint layout (shared by the parent and every child)
# ---------------------------------------------------------------------------------------
def layout(gb: float) -> tuple[int, int]:
    """(hidden, layers) of Linear(hidden, hidden) layers summing to about `gb` GB of fp32."""
    hidden = 4096 if gb >= 1.0 else 2048
    per_layer = 4 * hidden * (hidden + 1)
    layers = max(4, 4 * round(gb * 1e9 / per_layer / 4))  # a multiple of 4: 4 shards, mod-4 roles
    return hidden, layers


def ckpt_keys(layers: int) -> list[str]:
    return [f"layers.{i}.{p}" for i in range(layers) for p in ("weight", "bias")]


def rename_rules(scenario: str, layers: int) -> list[tuple[str, str]]:
    """graft's rename= for the changed model: checkpoint layers.N (N % 4 == 2) -> blocks.N."""
    if scenario != "index":
        return []
    return [(rf"^layers\.{i}\.", f"blocks.{i}.") for i in range(2, layers, 4)]


def apply_rules(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def build_model(scenario: str, hidden: int, layers: int):
    """The model the checkpoint is loaded into; parameters written once (pages resident)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if scenario != "index":
                self.layers = nn.ModuleDict({str(i): nn.Linear(hidden, hidden) for i in range(layers)})
            else:
                # The changed model: keeps layers 0, 4, 8...; takes 2, 6, 10... renamed to
                # blocks.*; drops the odd layers; adds a new head and norm.
                self.layers = nn.ModuleDict({str(i): nn.Linear(hidden, hidden) for i in range(0, layers, 4)})
                self.blocks = nn.ModuleDict({str(i): nn.Linear(hidden, hidden) for i in range(2, layers, 4)})
                self.head = nn.Linear(hidden, 256)
                self.norm = nn.LayerNorm(hidden)

    with torch.device("meta"):
        net = Net()
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for t in net.state_dict().values():
            t.fill_(-1.0)  # any write: the pages exist before the load, as after a real init
    return net


def shard_files(workdir: Path, scenario: str) -> list[Path]:
    if scenario == "pth":
        return [workdir / "model.pth"]
    if scenario == "safetensors":
        return [workdir / "model.safetensors"]
    return [workdir / "index" / f"model-{j + 1:05d}-of-{N_SHARDS:05d}.safetensors" for j in range(N_SHARDS)]


def load_path(workdir: Path, scenario: str) -> Path:
    if scenario == "index":
        return workdir / "index" / "model.safetensors.index.json"
    return shard_files(workdir, scenario)[0]


# ---------------------------------------------------------------------------------------
# Writing the checkpoints (parent)
# ---------------------------------------------------------------------------------------
def make_tensor(key: str, hidden: int):
    import torch

    shape = (hidden, hidden) if key.endswith("weight") else (hidden,)
    g = torch.Generator().manual_seed(sum(map(ord, key)) * 7919 + len(key))
    return torch.empty(shape).uniform_(-1, 1, generator=g)


def probe(t) -> list[float]:
    """A few values that identify a tensor: checked after every load."""
    flat = t.reshape(-1)
    idx = [0, 1, flat.numel() // 3, flat.numel() // 2, flat.numel() - 2, flat.numel() - 1]
    return [float(flat[i]) for i in idx]


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(workdir: Path, scenario: str, hidden: int, layers: int) -> dict:
    """Write the scenario's files with the real tools; return {key: probe values}."""
    import torch
    from safetensors.torch import save_file

    keys = ckpt_keys(layers)
    sd = {k: make_tensor(k, hidden) for k in keys}
    expect = {k: probe(v) for k, v in sd.items()}
    files = shard_files(workdir, scenario)
    files[0].parent.mkdir(parents=True, exist_ok=True)
    if scenario == "pth":
        torch.save(sd, files[0])
    elif scenario == "safetensors":
        save_file(sd, files[0], metadata={"format": "pt"})
    else:
        per = layers // N_SHARDS
        weight_map = {}
        for j, f in enumerate(files):
            part = {k: sd[k] for i in range(j * per, (j + 1) * per) for k in (f"layers.{i}.weight", f"layers.{i}.bias")}
            save_file(part, f, metadata={"format": "pt"})
            weight_map.update({k: f.name for k in part})
        index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
        load_path(workdir, scenario).write_text(json.dumps(index, indent=2, sort_keys=True))
    del sd
    gc.collect()
    for f in files:
        fsync(f)
    return expect


# ---------------------------------------------------------------------------------------
# Cache state (parent, before each child)
# ---------------------------------------------------------------------------------------
def cached_fraction(files) -> float | None:
    """Share of the files' pages in the page cache (via fincore, when installed)."""
    import subprocess

    if not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, timeout=30).stdout.split()
        res = sum(int(x) for x in out[0::2])
        size = sum(int(x) for x in out[1::2])
        return res / size if size else None
    except Exception:
        return None


# ---------------------------------------------------------------------------------------
# The methods (child)
# ---------------------------------------------------------------------------------------
def handwritten_apply(model, sd, rules) -> None:
    """What people write: rename, keep what exists with the same shape, strict=False."""
    own = model.state_dict()
    keep = {}
    for k, v in sd.items():
        mk = apply_rules(k, rules)
        if mk in own and tuple(own[mk].shape) == tuple(v.shape):
            keep[mk] = v
    model.load_state_dict(keep, strict=False)


def m_graft(model, ctx):
    import graft

    kw = {"rename": ctx["rules"]} if ctx["rules"] else {}
    graft.load(model, ctx["path"], verbose=False, progress=False, **kw)


def m_torch_load(model, ctx, mmap=False):
    import torch

    sd = torch.load(ctx["path"], map_location="cpu", weights_only=True, mmap=mmap)
    handwritten_apply(model, sd, ctx["rules"])
    del sd


def m_st_load_file(model, ctx):
    from safetensors.torch import load_file

    for f in ctx["files"]:
        sd = load_file(f)
        handwritten_apply(model, sd, ctx["rules"])
        del sd


def m_st_safe_open(model, ctx):
    import torch
    from safetensors import safe_open

    own = model.state_dict()
    with torch.no_grad():
        for f in ctx["files"]:
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    mk = apply_rules(k, ctx["rules"])
                    if mk in own and tuple(own[mk].shape) == tuple(fh.get_slice(k).get_shape()):
                        own[mk].copy_(fh.get_tensor(k))


def m_accelerate(model, ctx):
    from accelerate.utils import load_checkpoint_in_model

    # accelerate has no rename: alias each renamed module under its checkpoint name
    # for the call (the hand-written rename), then take the aliases away.
    aliases = []
    for pattern, repl in ctx["rules"]:
        src = re.match(r"\^layers\\\.(\d+)\\\.", pattern).group(1)
        model.layers[src] = model.blocks[src]
        aliases.append(src)
    try:
        load_checkpoint_in_model(model, ctx["path"])
    finally:
        for src in aliases:
            del model.layers[src]


def floor_items(model, ctx):
    """(file, offset, nbytes, tensor) of every kept tensor, in file order: metadata only."""
    own = model.state_dict()
    items = []
    if ctx["scenario"] == "pth":
        import graft

        with graft.open(ctx["path"]) as ck:
            spans = {k: ck.span(k) for k in ck.keys()}
        for k, s in spans.items():
            mk = apply_rules(k, ctx["rules"])
            if mk in own:
                items.append((s.file, s.offset, s.nbytes, own[mk]))
    else:
        import struct

        for f in ctx["files"]:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for k, e in header.items():
                mk = apply_rules(k, ctx["rules"])
                if mk in own and list(own[mk].shape) == e["shape"]:
                    b, end = e["data_offsets"]
                    items.append((f, 8 + n + b, end - b, own[mk]))
    items.sort(key=lambda it: (it[0], it[1]))
    return items


def m_floor(model, ctx, items):
    import ctypes

    fd, cur = -1, None
    try:
        for f, off, nbytes, t in items:
            if f != cur:
                if fd >= 0:
                    os.close(fd)
                fd, cur = os.open(f, os.O_RDONLY), f
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # as `cat` does: the fastest hint here
            view = memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:done + (1 << 30)]], off + done)
                assert n > 0
                done += n
    finally:
        if fd >= 0:
            os.close(fd)


METHODS = {
    "graft": m_graft,
    "torch.load": m_torch_load,
    "torch.mmap": lambda model, ctx: m_torch_load(model, ctx, mmap=True),
    "st.load_file": m_st_load_file,
    "st.safe_open": m_st_safe_open,
    "accelerate": m_accelerate,
}


# ---------------------------------------------------------------------------------------
# Measuring one load (child)
# ---------------------------------------------------------------------------------------
def measure(spec: dict) -> dict:
    import torch

    scenario, method = spec["scenario"], spec["method"]
    model = build_model(scenario, spec["hidden"], spec["layers"])
    ctx = {
        "scenario": scenario,
        "path": spec["path"],
        "files": spec["files"],
        "rules": [tuple(r) for r in spec["rules"]],
    }
    # Imports a method makes inside its call are paid before the clock starts: the
    # benchmark times loading, not importing.
    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    if method == "accelerate":
        import accelerate.utils  # noqa: F401
        import torch._dynamo  # noqa: F401  (set_model_state_dict imports it lazily: ~3 s)
        import torch.distributed.checkpoint.state_dict  # noqa: F401
    elif method.startswith("st."):
        import safetensors.torch  # noqa: F401
    elif method in ("graft", "floor"):
        import graft  # noqa: F401
    if method == "floor":
        items = floor_items(model, ctx)
        fn = lambda m, c: m_floor(m, c, items)  # noqa: E731
    else:
        fn = METHODS[method]
    gc.collect()
    try:  # reset VmHWM so it reports the peak of the load itself (a cross-check)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = status_kb()
    io0 = read_bytes()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        fn(model, ctx)
        wall = time.perf_counter() - t0
    io1 = read_bytes()
    end = status_kb()
    # Correctness: every kept tensor holds the checkpoint's values.
    own = model.state_dict()
    bad = []
    checked = 0
    for k, values in spec["expect"].items():
        mk = apply_rules(k, ctx["rules"])
        if mk in own:
            checked += 1
            if probe(own[mk]) != values:
                bad.append(mk)
    return {
        "wall": wall,
        "anon": peak.extra_anon,
        "file": peak.extra_file,
        "hwm": (end["VmHWM"] - base["VmRSS"]) * 1024,
        "read": io1 - io0,
        "samples": peak.samples,
        "checked": checked,
        "bad": bad[:5],
        "threads": torch.get_num_threads(),
    }


def spawn_main() -> None:
    """--child mode for --spawn: the spec on stdin, the result as JSON on stdout."""
    spec = json.loads(sys.stdin.read())
    try:
        result = measure(spec)
    except BaseException:  # noqa: BLE001
        result = {"error": traceback.format_exc()}
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------
# The parent: scenarios, runs, table, targets
# ---------------------------------------------------------------------------------------
def run_child(spec: dict, use_spawn: bool, mpctx, timeout: float) -> dict:
    if use_spawn:
        import subprocess

        p = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(spec),
                           capture_output=True, text=True, timeout=timeout)
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        return {"error": f"exit {p.returncode}: {p.stderr[-2000:]}"}
    return run_in_child(measure, spec, mpctx, timeout)


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=None, help="checkpoint size per scenario, GB (default 2.0)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement; the median is shown (default 3)")
    ap.add_argument("--quick", action="store_true", help="development: --gb 0.25 --repeats 1")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {SCENARIOS}")
    ap.add_argument("--states", default=",".join(STATES), help="comma list of warm,cold")
    ap.add_argument("--methods", default=None, help="comma list to restrict the methods (graft and floor always run)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out", help="where the checkpoints are written")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--spawn", action="store_true", help="a new interpreter per run instead of a fork of an idle server")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spawn_main()
        return 0
    gb = args.gb if args.gb is not None else (0.25 if args.quick else 2.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    scenarios = [s for s in args.scenarios.split(",") if s]
    states = [s for s in args.states.split(",") if s]
    only = set(args.methods.split(",")) if args.methods else None
    for s in scenarios:
        assert s in SCENARIOS, s
    hidden, layers = layout(gb)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    mpctx = None
    if not args.spawn:
        mpctx = mp.get_context("forkserver")
        mpctx.set_forkserver_preload(["torch", "safetensors.torch", "accelerate.utils",
                                   "torch.distributed.checkpoint.state_dict", "torch._dynamo", "graft", "__main__"])

    model_bytes_full = layers * 4 * hidden * (hidden + 1)
    print(f"# bench/load.py: {layers} x Linear({hidden}, {hidden}) fp32 = {model_bytes_full / 1e9:.2f} GB per "
          f"checkpoint; {repeats} run(s) each, median; "
          f"{'spawned' if args.spawn else 'forked'} fresh process per run; {os.cpu_count()} CPUs", flush=True)

    rows = []  # (scenario, state, method, medians dict, runs)
    all_runs = []
    facts = {}
    started = time.time()
    try:
        for scenario in scenarios:
            t0 = time.time()
            files = shard_files(workdir, scenario)
            if not (args.keep and all(f.exists() for f in files) and (workdir / f"{scenario}.expect.json").exists()):
                expect = write_checkpoint(workdir, scenario, hidden, layers)
                (workdir / f"{scenario}.expect.json").write_text(json.dumps(expect))
            else:
                expect = json.loads((workdir / f"{scenario}.expect.json").read_text())
            rules = rename_rules(scenario, layers)
            model = build_model_meta_bytes(scenario, hidden, layers)
            kept_keys = [k for k in expect if apply_rules(k, rules) in model["keys"]]
            kept_bytes = sum(4 * hidden * hidden if k.endswith("weight") else 4 * hidden for k in kept_keys)
            facts[scenario] = {"model_bytes": model["bytes"], "kept_bytes": kept_bytes,
                               "file_bytes": sum(f.stat().st_size for f in files)}
            print(f"# {scenario}: wrote {len(files)} file(s), {facts[scenario]['file_bytes'] / 1e9:.2f} GB "
                  f"in {time.time() - t0:.0f} s; model {model['bytes'] / 1e9:.2f} GB, keeps "
                  f"{len(kept_keys)}/{len(expect)} keys = {kept_bytes / 1e9:.2f} GB", flush=True)
            methods = ["graft", *PEERS[scenario], "floor"]
            if only:
                methods = [m for m in methods if m in only or m in ("graft", "floor")]
            spec_base = {"scenario": scenario, "hidden": hidden, "layers": layers,
                         "path": str(load_path(workdir, scenario)), "files": [str(f) for f in files],
                         "rules": rules, "expect": expect}
            for state in states:
                runs = {m: [] for m in methods}
                for r in range(repeats):
                    order = methods[r % len(methods):] + methods[:r % len(methods)]  # rotate: no method always first
                    for method in order:
                        if state == "cold":
                            drop_cache(files)
                        else:
                            warm_cache(files)
                        cached = cached_fraction(files)
                        res = run_child({**spec_base, "method": method}, args.spawn, mpctx, timeout=600)
                        res["cached_before"] = cached
                        if "error" in res:
                            print(f"!! {scenario}/{state}/{method}: {res['error']}", flush=True)
                        elif res["bad"]:
                            print(f"!! {scenario}/{state}/{method}: WRONG VALUES in {res['bad']}", flush=True)
                        runs[method].append(res)
                        all_runs.append({"scenario": scenario, "state": state, "method": method, "run": r, **res})
                for method in methods:
                    ok = [x for x in runs[method] if "error" not in x]
                    if not ok:
                        continue
                    med = {f: statistics.median(x[f] for x in ok) for f in ("wall", "anon", "file", "read", "hwm")}
                    med["n"] = len(ok)
                    med["wall_min"] = min(x["wall"] for x in ok)
                    med["wall_max"] = max(x["wall"] for x in ok)
                    rows.append((scenario, state, method, med))
                print_table([row for row in rows if row[0] == scenario and row[1] == state], facts)
            if not args.keep:
                remove_files(workdir, scenario)
    finally:
        if not args.keep:
            for scenario in SCENARIOS:
                remove_files(workdir, scenario)
    print(f"\n# total {time.time() - started:.0f} s")
    ok = print_targets(rows, facts)
    if args.json:
        args.json.write_text(json.dumps({"gb": gb, "hidden": hidden, "layers": layers, "repeats": repeats,
                                         "facts": facts, "runs": [{k: v for k, v in r.items() if k != "expect"}
                                                                  for r in all_runs]}, indent=1))
    return 0 if ok else 1


def build_model_meta_bytes(scenario: str, hidden: int, layers: int) -> dict:
    """Keys and byte size of the scenario's model, without allocating it."""
    keys, nbytes = set(), 0
    if scenario != "index":
        idx = {"layers": range(layers)}
    else:
        idx = {"layers": range(0, layers, 4), "blocks": range(2, layers, 4)}
    for name, rng in idx.items():
        for i in rng:
            keys |= {f"{name}.{i}.weight", f"{name}.{i}.bias"}
            nbytes += 4 * hidden * (hidden + 1)
    if scenario == "index":
        keys |= {"head.weight", "head.bias", "norm.weight", "norm.bias"}
        nbytes += 4 * (256 * hidden + 256) + 4 * 2 * hidden
    return {"keys": keys, "bytes": nbytes}


def remove_files(workdir: Path, scenario: str) -> None:
    for f in shard_files(workdir, scenario):
        f.unlink(missing_ok=True)
    (workdir / f"{scenario}.expect.json").unlink(missing_ok=True)
    if scenario == "index":
        load_path(workdir, scenario).unlink(missing_ok=True)
        try:
            (workdir / "index").rmdir()
        except OSError:
            pass
    try:
        workdir.rmdir()
    except OSError:
        pass


def print_table(rows, facts) -> None:
    if not rows:
        return
    scenario, state = rows[0][0], rows[0][1]
    f = facts[scenario]
    by = {m: med for _, _, m, med in rows}
    floor = by.get("floor", {}).get("wall")
    peers = [med["wall"] for m, med in by.items() if m not in ("graft", "floor")]
    best = min(peers) if peers else None
    print(f"\n## {scenario}, {state}  (model {f['model_bytes'] / 1e9:.2f} GB, kept "
          f"{f['kept_bytes'] / 1e9:.2f} GB of {f['file_bytes'] / 1e9:.2f} GB on disk)")
    print(f"| method | wall s (min-max) | x floor | x best peer | +anon MB | +file MB | read MB | read / kept |")
    print("|---|---|---|---|---|---|---|---|")
    for m, med in by.items():
        xf = f"{med['wall'] / floor:.2f}" if floor else "-"
        xb = f"{med['wall'] / best:.2f}" if best else "-"
        print(f"| {m} | {med['wall']:.2f} ({med['wall_min']:.2f}-{med['wall_max']:.2f}) | {xf} | {xb} | "
              f"{fmt_mb(med['anon'])} | {fmt_mb(med['file'])} | {fmt_mb(med['read'])} | "
              f"{med['read'] / f['kept_bytes']:.2f} |", flush=True)


def print_targets(rows, facts) -> bool:
    print("\n# targets")
    table = {(s, st, m): med for s, st, m, med in rows}
    all_ok = True

    def line(ok: bool, text: str):
        nonlocal all_ok
        all_ok &= ok
        print(f"{'PASS' if ok else 'MISS'}  {text}")

    for (s, st) in sorted({(s, st) for s, st, _, _ in rows}, key=lambda x: (SCENARIOS.index(x[0]), x[1] != "warm")):
        g = table.get((s, st, "graft"))
        if g is None:
            continue
        peers = {m: med for (s2, st2, m), med in table.items() if (s2, st2) == (s, st) and m not in ("graft", "floor")}
        if peers:
            bm = min(peers, key=lambda m: peers[m]["wall"])
            line(g["wall"] <= peers[bm]["wall"],
                 f"{s}/{st}: graft {g['wall']:.2f} s <= best peer {bm} {peers[bm]['wall']:.2f} s")
        fl = table.get((s, st, "floor"))
        if fl:
            line(g["wall"] <= 1.25 * fl["wall"],
                 f"{s}/{st}: graft {g['wall']:.2f} s <= 1.25 x floor {fl['wall']:.2f} s "
                 f"(x{g['wall'] / fl['wall']:.2f})")
        limit = BUCKET_BYTES + 0.10 * facts[s]["model_bytes"]
        line(g["anon"] <= limit, f"{s}/{st}: graft +anon {fmt_mb(g['anon'])} MB <= 64 MB + 10% of the model "
                                  f"= {fmt_mb(limit)} MB")
        if s == "index" and st == "cold":
            kept = facts[s]["kept_bytes"]
            line(g["read"] <= 1.05 * kept, f"{s}/{st}: graft read {fmt_mb(g['read'])} MB <= 1.05 x kept "
                                            f"{fmt_mb(kept)} MB (x{g['read'] / kept:.3f})")
    return all_ok


if __name__ == "__main__":
    sys.exit(main())
