"""Distributed load benchmark: graft against the usual ways, with the floors, warm and cold.

    .venv/bin/python bench/broadcast.py            # 2 GB checkpoint, median of 3
    .venv/bin/python bench/broadcast.py --quick    # 256 MB, one repetition

Starts `torchrun --nproc_per_node 2` on this machine (gloo, CPU) and, in one process group,
times each method on the same model (fp32 Linear layers summing to --gb):

  graft              graft.load, strategy="broadcast": rank 0 reads, buckets are broadcast
                     (rank 1 is given a path that does not exist)
  graft every-rank   graft.load, strategy="every-rank": each rank reads the file itself
  every rank loads   safetensors load_file + load_state_dict on each rank
  torch bcast        rank 0 torch.load(mmap=True, weights_only=True), then
                     set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)
  floor: broadcast   the same bytes, gloo broadcast in buckets of --bucket-mb, nothing else
  floor: read        rank 0 reads the file into a reused buffer, nothing else

Per run: wall time of the slowest rank (after a barrier), extra anonymous and extra
file-backed resident memory per rank (peak over the run minus the level before it,
sampled every 2 ms from /proc/self/status), and bytes fetched from storage per rank
(/proc/self/io read_bytes: zero when the file is in the page cache). Cold: the files are
dropped from the page cache (posix_fadvise DONTNEED) before each run; warm: read once
before. The median of --reps runs is reported, then the issue's targets as PASS/MISS.
Quote ratios, not absolute times: the machine's disk and cores set the latter.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

from procstats import PeakRss, drop_cache, launch_workers, read_bytes, warm_cache

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
ROWS, COLS = 4096, 4096  # one 64 MB fp32 weight per layer
METHODS = ["graft", "graft every-rank", "every rank loads", "torch bcast", "floor: broadcast", "floor: read"]
MISSING = "/nonexistent/bench/rank1-never-sees-the-file.safetensors"


# -- the model and its checkpoint ---------------------------------------------------------


def n_layers(gb: float) -> int:
    return max(1, round(gb * 2**30 / (ROWS * COLS * 4)))


def build_model(layers: int):
    import torch

    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(COLS, ROWS) for _ in range(layers)])
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # touch every page: the model is part of the baseline, not "extra"
    return model


def write_checkpoint(layers: int, st: Path, pt: Path) -> None:
    import torch
    from safetensors.torch import save_file

    if st.exists() and pt.exists():
        return
    st.parent.mkdir(parents=True, exist_ok=True)
    sd = {}
    for i in range(layers):
        sd[f"{i}.weight"] = torch.full((ROWS, COLS), float(i + 1))
        sd[f"{i}.bias"] = torch.full((ROWS,), -float(i + 1))
    print(f"writing {st.name} and {pt.name} ({layers * ROWS * (COLS + 1) * 4 / 2**30:.2f} GiB each)", flush=True)
    save_file(sd, str(st) + ".tmp")
    os.replace(str(st) + ".tmp", st)
    torch.save(sd, str(pt) + ".tmp")
    os.replace(str(pt) + ".tmp", pt)


def check_values(model) -> bool:
    for i, layer in enumerate(model):
        w, b = layer.weight, layer.bias
        if not (w[0, 0] == i + 1 and w[-1, -1] == i + 1 and b[0] == -(i + 1) and b[-1] == -(i + 1)):
            return False
    return True


# -- measuring ----------------------------------------------------------------------------


# -- the methods (each runs on every rank) --------------------------------------------------


def run_method(name, model, rank, st: Path, pt: Path, bucket_mb: float, buffers):
    import torch
    import torch.distributed as dist

    import graft

    if name == "graft":
        graft.load(model, str(st) if rank == 0 else MISSING, bucket_mb=bucket_mb, progress=False, verbose=False)
    elif name == "graft every-rank":
        graft.load(model, st, strategy="every-rank", bucket_mb=bucket_mb, progress=False, verbose=False)
    elif name == "every rank loads":
        from safetensors.torch import load_file

        sd = load_file(st)
        model.load_state_dict(sd)
        del sd
    elif name == "torch bcast":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        sd = torch.load(pt, mmap=True, weights_only=True) if rank == 0 else {}
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del sd
    elif name == "floor: broadcast":
        total = st.stat().st_size
        bucket = buffers[0]
        for off in range(0, total, bucket.numel()):
            dist.broadcast(bucket[: min(bucket.numel(), total - off)], src=0)
    elif name == "floor: read":
        if rank == 0:
            from graft.loading.formats.reading import writable_buffer

            view = writable_buffer(buffers[0])
            fd = os.open(st, os.O_RDONLY)
            try:
                off = 0
                while n := os.preadv(fd, [view], off):
                    off += n
            finally:
                os.close(fd)
    else:
        raise ValueError(name)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    st, pt = Path(args.st), Path(args.pt)
    model = build_model(args.layers)
    # The floors' buffer, allocated and touched once, outside every timed region.
    buffers = [torch.ones(int(args.bucket_mb * 2**20), dtype=torch.uint8)]
    # Untimed first pass of every method: imports, first-call set-up, gloo's first large
    # messages; it also leaves the files in the page cache for the warm runs.
    for name in args.methods.split(","):
        run_method(name, model, rank, st, pt, args.bucket_mb, buffers)
        gc.collect()
        dist.barrier()
    records = []
    for cond in args.conds.split(","):
        for rep in range(args.reps):
            for name in args.methods.split(","):
                with torch.no_grad():
                    for p in model.parameters():
                        p.zero_()
                gc.collect()
                if rank == 0:
                    for f in (st, pt):
                        drop_cache([f]) if cond == "cold" else (warm_cache([f]) if rep == 0 else None)
                dist.barrier()
                before = read_bytes()
                with PeakRss() as peak:
                    t0 = time.perf_counter()
                    run_method(name, model, rank, st, pt, args.bucket_mb, buffers)
                    seconds = time.perf_counter() - t0
                gc.collect()
                ok = check_values(model) if not name.startswith("floor") else True
                mine = {"seconds": seconds, "anon": peak.extra_anon, "file": peak.extra_file,
                        "read": read_bytes() - before, "ok": ok}
                gathered = [None] * world
                dist.all_gather_object(gathered, mine)
                if rank == 0:
                    rec = {"method": name, "cond": cond, "rep": rep, "ranks": gathered,
                           "wall": max(g["seconds"] for g in gathered)}
                    records.append(rec)
                    print(f"  {cond:4s} rep {rep} {name:18s} {rec['wall']:7.3f} s"
                          + ("" if all(g["ok"] for g in gathered) else "  WRONG VALUES"), flush=True)
    if rank == 0:
        Path(args.out).write_text(json.dumps(records, indent=1))
    dist.destroy_process_group()


# -- the driver -----------------------------------------------------------------------------


def summarise(records, model_bytes: int, bucket_mb: float, conds) -> str:
    def med(method, cond, f):
        vals = [f(r) for r in records if r["method"] == method and r["cond"] == cond]
        return statistics.median(vals) if vals else float("nan")

    def worst(method, cond, key, rank):
        vals = [r["ranks"][rank][key] for r in records if r["method"] == method and r["cond"] == cond]
        return max(vals) if vals else 0

    mb = lambda b: b / 2**20  # noqa: E731
    methods = list(dict.fromkeys(r["method"] for r in records))
    lines = ["| method | cache | wall s (slowest rank, median) | x floor | extra anon MiB r0 / r1 |"
             " extra file MiB r0 / r1 | read from storage MiB r0 / r1 | values |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for cond in conds:
        floor = max(med("floor: broadcast", cond, lambda r: r["wall"]), med("floor: read", cond, lambda r: r["wall"]))
        for m in methods:
            wall = med(m, cond, lambda r: r["wall"])
            ok = all(g["ok"] for r in records if r["method"] == m and r["cond"] == cond for g in r["ranks"])
            lines.append(
                f"| {m} | {cond} | {wall:.3f} | {wall / floor:.2f} |"
                f" {mb(worst(m, cond, 'anon', 0)):.0f} / {mb(worst(m, cond, 'anon', 1)):.0f} |"
                f" {mb(worst(m, cond, 'file', 0)):.0f} / {mb(worst(m, cond, 'file', 1)):.0f} |"
                f" {mb(worst(m, cond, 'read', 0)):.0f} / {mb(worst(m, cond, 'read', 1)):.0f} |"
                f" {'ok' if ok else 'WRONG'} |")
        g = med("graft", cond, lambda r: r["wall"])
        tb = med("torch bcast", cond, lambda r: r["wall"])
        ev = med("every rank loads", cond, lambda r: r["wall"])
        verdicts.append((f"{cond}: graft >= 5x faster than torch bcast ({tb / g:.1f}x)", tb / g >= 5))
        verdicts.append((f"{cond}: graft within 1.3x of max(read floor, broadcast floor) ({g / floor:.2f}x)",
                         g / floor <= 1.3))
        if cond == "cold":
            verdicts.append((f"cold: graft faster than every rank loads ({ev / g:.2f}x)", g < ev))
    limit = bucket_mb * 2**20 + 0.1 * model_bytes
    anon = max(r["ranks"][k]["anon"] for r in records if r["method"] == "graft" for k in range(2))
    verdicts.append((f"graft extra anonymous memory, every rank, <= one bucket + 10% of the model"
                     f" ({mb(anon):.0f} MiB <= {mb(limit):.0f} MiB)", anon <= limit))
    r1 = max(r["ranks"][1]["read"] for r in records if r["method"] == "graft")
    verdicts.append((f"graft bytes read on rank 1 = 0 ({r1} B; its path does not even exist)", r1 == 0))
    lines.append("")
    for text, ok in verdicts:
        lines.append(f"{'PASS' if ok else 'MISS'}  {text}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GiB (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (default 3)")
    ap.add_argument("--bucket-mb", type=float, default=64, help="graft's bucket_mb and the floor's bucket")
    ap.add_argument("--quick", action="store_true", help="256 MiB, one repetition")
    ap.add_argument("--conds", default="warm,cold")
    ap.add_argument("--methods", default=",".join(METHODS))
    if "GRAFT_BENCH_WORKER" in os.environ:
        return worker(argparse.Namespace(**json.loads(os.environ["GRAFT_BENCH_WORKER"])))
    args = ap.parse_args()
    if args.quick:
        args.gb, args.reps = 0.25, 1
    layers = n_layers(args.gb)
    model_bytes = layers * ROWS * (COLS + 1) * 4
    st, pt = OUT / f"bench-{layers}x64MB.safetensors", OUT / f"bench-{layers}x64MB.pt"
    write_checkpoint(layers, st, pt)
    out = OUT / f"broadcast-{layers}x64MB.json"
    settings = {"layers": layers, "st": str(st), "pt": str(pt), "out": str(out), "reps": args.reps,
                "bucket_mb": args.bucket_mb, "conds": args.conds, "methods": args.methods}
    print(f"model {model_bytes / 2**30:.2f} GiB ({layers} layers), bucket_mb {args.bucket_mb}, reps {args.reps},"
          f" 2 processes, gloo on CPU; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    launch_workers(__file__, settings)
    records = json.loads(out.read_text())
    print()
    print(summarise(records, model_bytes, args.bucket_mb, args.conds.split(",")))


if __name__ == "__main__":
    main()
