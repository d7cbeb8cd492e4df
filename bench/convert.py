#!/usr/bin/env python
"""Conversion benchmark: `graft convert` against the usual scripts, and against the floor.

Three conversions users run to get a model out of a trainer, each source written by the
real tool (about --gb GB of fp32 Linear layers, the same values in all three):

  zero3 -> hf    a DeepSpeed ZeRO-3 folder (2 ranks, torchrun, gloo, SGD so the optimizer
                 adds no state) to HF safetensors.
                 peer: deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
                 + safetensors.torch.save_file
  dcp -> torch   a torch.distributed.checkpoint folder (dcp.save) to one .pth.
                 peer: torch.distributed.checkpoint.format_utils.dcp_to_torch_save
  pth -> hf      a torch.save file to HF safetensors shards + index.
                 peer: torch.load(weights_only=True) + huggingface_hub.save_torch_state_dict
  floor          the same source files read (64 MiB reusable buffer) and written to one
                 new file, fsynced: the machine's read + write of those bytes, not a peer.

Every run is a fresh process forked from an idle server that has imported the libraries
(imports are not timed); the source files are warm in the page cache before each run, and
`sync` has run (no earlier run's dirty pages to write back).
Every method's output is fsynced inside the timed region (graft fsyncs; for the peers the
benchmark does it): a conversion counts once its output is on disk. Figures per run:
  wall   seconds of the conversion call; +anon  peak RssAnon above the level at the start
  (the extra memory the method holds: graft's read buffer, the peers' full copies).
The output's key set and the first values of every tensor are checked after each run.

Run:  .venv/bin/python bench/convert.py            (~2 GiB, 3 runs each, median)
      .venv/bin/python bench/convert.py --quick    (0.25 GiB, 1 run each, for development)
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linear_layers import layout, make_state, probe  # noqa: E402
from procstats import PeakRss, launch_workers, run_in_child, warm_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("zero3->hf", "dcp->torch", "pth->hf")
BUFFER_BYTES = 64 << 20  # graft.convert's default read buffer
MB = 1 << 20


# ---------------------------------------------------------------------------------------
# The sources (written once, by the real tools)
# ---------------------------------------------------------------------------------------
def zero3_worker(settings: dict) -> None:
    """Under torchrun: build the model with make_state's values, ZeRO-3 it, save_checkpoint."""
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    sd = make_state(settings["hidden"], settings["layers"])
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(settings["hidden"], settings["hidden"])
                                       for _ in range(settings["layers"]))
    model.load_state_dict(sd)
    del sd
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config)
    engine.save_checkpoint(settings["out"], tag="global_step0")
    dist.barrier()
    engine.destroy()
    dist.destroy_process_group()


def write_sources(workdir: Path, hidden: int, layers: int) -> dict[str, Path]:
    import torch
    import torch.distributed.checkpoint as dcp

    paths = {"pth": workdir / "src.pth", "dcp": workdir / "src_dcp", "zero3": workdir / "src_zero3"}
    sd = make_state(hidden, layers)
    torch.save(sd, paths["pth"])
    dcp.save(sd, checkpoint_id=paths["dcp"], no_dist=True)
    del sd
    gc.collect()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    launch_workers(__file__, {"out": str(paths["zero3"]), "hidden": hidden, "layers": layers}, repo=str(ROOT))
    return paths


def source_files(path: Path) -> list[Path]:
    """The files holding the source's tensor bytes (what the floor copies)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix == ".distcp" or "optim_states" in p.name))


# ---------------------------------------------------------------------------------------
# The methods (each in a fresh child)
# ---------------------------------------------------------------------------------------
def fsync_tree(path: Path) -> None:
    for p in [path] if path.is_file() else sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def m_graft(src: Path, out: Path, to: str) -> None:
    import graft

    graft.convert(src, out, to=to, progress=False)


def m_zero_to_fp32(src: Path, out: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    sd = get_fp32_state_dict_from_zero_checkpoint(str(src))
    out.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, out / "model.safetensors", metadata={"format": "pt"})
    fsync_tree(out)


def m_dcp_to_torch_save(src: Path, out: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(src, out)
    fsync_tree(out)


def m_torch_load_hub(src: Path, out: Path) -> None:
    import torch
    from huggingface_hub import save_torch_state_dict

    out.mkdir()
    save_torch_state_dict(torch.load(src, weights_only=True), out)
    fsync_tree(out)


def m_floor(src: Path, out: Path) -> None:
    buf = bytearray(64 * MB)
    view = memoryview(buf)
    with open(out, "wb", buffering=0) as w:
        for f in source_files(src):
            with open(f, "rb", buffering=0) as r:
                os.posix_fadvise(r.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while n := r.readinto(buf):
                    done = 0
                    while done < n:
                        done += w.write(view[done:n])
        os.fsync(w.fileno())


PEER = {"zero3->hf": ("zero_to_fp32+save_file", m_zero_to_fp32),
        "dcp->torch": ("dcp_to_torch_save", m_dcp_to_torch_save),
        "pth->hf": ("torch.load+save_torch_state_dict", m_torch_load_hub)}


def read_output(out: Path) -> dict:
    """Every output tensor's first values, read back by the target's own reader."""
    import torch
    from safetensors import safe_open

    if out.is_file():
        return {k: probe(v) for k, v in torch.load(out, weights_only=True, mmap=True).items()}
    got = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            got.update({k: probe(f.get_tensor(k)) for k in f.keys()})
    return got


def measure(spec: dict) -> dict:
    scenario, method = spec["scenario"], spec["method"]
    src, out = Path(spec["src"]), Path(spec["out"])
    to = scenario.split("->")[1]
    if method == "graft":
        # What the call imports lazily is paid before the clock starts, as for the peers.
        import importlib

        import tqdm.auto  # noqa: F401

        from graft.conversion.writers import WRITERS
        importlib.import_module("graft.conversion.writers." + WRITERS[to].split(":")[0])
        fn = lambda: m_graft(src, out, to)  # noqa: E731
    elif method == "floor":
        fn = lambda: m_floor(src, out)  # noqa: E731
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: F401
        from huggingface_hub import save_torch_state_dict  # noqa: F401
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: F401
        fn = lambda: PEER[scenario][1](src, out)  # noqa: E731
    gc.collect()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    bad = []
    if method != "floor":
        got = read_output(out)
        bad = sorted(set(spec["expect"]) ^ set(got))[:5]
        bad += [k for k, v in spec["expect"].items() if k in got and got[k] != v][:5]
    return {"wall": wall, "anon": peak.extra_anon, "bad": bad}


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# The parent: runs, table, targets
# ---------------------------------------------------------------------------------------
def main() -> int:
    if "GRAFT_BENCH_WORKER" in os.environ:
        zero3_worker(json.loads(os.environ["GRAFT_BENCH_WORKER"]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=None, help="model size, GiB (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per method; the median is shown (default 3)")
    ap.add_argument("--quick", action="store_true", help="development: --gb 0.25 --repeats 1")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "convert")
    args = ap.parse_args()
    gb = args.gb if args.gb is not None else (0.25 if args.quick else 2.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    hidden, layers = layout(gb)
    model_bytes = layers * 4 * hidden * (hidden + 1)
    largest = 4 * hidden * hidden
    workdir = args.workdir.resolve()
    remove(workdir)
    workdir.mkdir(parents=True)

    mpctx = mp.get_context("forkserver")
    mpctx.set_forkserver_preload(["torch", "safetensors.torch", "huggingface_hub", "graft",
                                  "torch.distributed.checkpoint.format_utils", "deepspeed.utils.zero_to_fp32"])
    print(f"# bench/convert.py: {layers} x Linear({hidden}, {hidden}) fp32 = {model_bytes / 2**30:.2f} GiB, largest "
          f"tensor {largest / MB:.0f} MiB; {repeats} run(s) each, median; warm sources; {os.cpu_count()} CPUs",
          flush=True)
    started = time.time()
    rows = {}
    try:
        t0 = time.time()
        paths = write_sources(workdir, hidden, layers)
        print(f"# sources written in {time.time() - t0:.0f} s", flush=True)
        expect = {k: probe(v) for k, v in make_state(hidden, layers).items()}
        for scenario in SCENARIOS:
            src = paths[scenario.split("->")[0]]
            files = source_files(src)
            methods = ["graft", PEER[scenario][0], "floor"]
            runs: dict[str, list] = {m: [] for m in methods}
            for r in range(repeats):
                for method in methods[r % 3:] + methods[:r % 3]:  # rotate: no method always first
                    out = workdir / f"out_{method.split('+')[0]}"
                    remove(out)
                    warm_cache(files)
                    # No dirty pages of an earlier run (or of writing the sources) left for this
                    # one's writes to wait behind: every method starts from a clean page cache.
                    os.sync()
                    spec = {"scenario": scenario, "method": method, "src": str(src), "out": str(out),
                            "expect": expect}
                    res = run_in_child(measure, spec, mpctx)
                    remove(out)
                    if "error" in res:
                        print(f"!! {scenario}/{method}: {res['error']}", flush=True)
                        continue
                    if res["bad"]:
                        print(f"!! {scenario}/{method}: WRONG OUTPUT {res['bad']}", flush=True)
                    runs[method].append(res)
            print(f"\n## {scenario}  ({sum(f.stat().st_size for f in files) / 2**30:.2f} GiB of source files)")
            print("| method | wall s (min-max) | x floor | x graft | +anon MB |")
            print("|---|---|---|---|---|")
            med = {m: {"wall": statistics.median(x["wall"] for x in rs), "min": min(x["wall"] for x in rs),
                       "max": max(x["wall"] for x in rs), "anon": statistics.median(x["anon"] for x in rs)}
                   for m, rs in runs.items() if rs}
            rows[scenario] = med
            for m, v in med.items():
                xf = v["wall"] / med["floor"]["wall"] if "floor" in med else float("nan")
                xg = v["wall"] / med["graft"]["wall"] if "graft" in med else float("nan")
                print(f"| {m} | {v['wall']:.2f} ({v['min']:.2f}-{v['max']:.2f}) | {xf:.2f} | {xg:.2f} | "
                      f"{v['anon'] / MB:,.0f} |", flush=True)
    finally:
        remove(workdir)
    print(f"\n# total {time.time() - started:.0f} s\n# targets")
    ok = True
    limit = largest + BUFFER_BYTES + 64 * MB  # + 64 MB for the interpreter's own allocations
    for scenario, med in rows.items():
        g, peer, fl = med.get("graft"), med.get(PEER[scenario][0]), med.get("floor")
        checks = []
        if g and peer:
            checks.append((g["wall"] <= peer["wall"], f"graft {g['wall']:.2f} s <= {PEER[scenario][0]} "
                                                      f"{peer['wall']:.2f} s (x{peer['wall'] / g['wall']:.2f} faster)"))
        if g and fl:
            checks.append((g["wall"] <= 1.3 * fl["wall"], f"graft {g['wall']:.2f} s <= 1.3 x floor {fl['wall']:.2f} s "
                                                          f"(x{g['wall'] / fl['wall']:.2f})"))
        if g:
            checks.append((g["anon"] <= limit, f"graft +anon {g['anon'] / MB:,.0f} MB <= largest tensor + buffer + "
                                               f"64 MB = {limit / MB:,.0f} MB"
                                               + (f" (peer {peer['anon'] / MB:,.0f} MB)" if peer else "")))
        for passed, text in checks:
            ok &= passed
            print(f"{'PASS' if passed else 'MISS'}  {scenario}: {text}")
    return 0 if ok and len(rows) == len(SCENARIOS) else 1


if __name__ == "__main__":
    sys.exit(main())
