"""Save and resume benchmark: graft's sharded run checkpoint against the usual ways, with floors.

    .venv/bin/python bench/save.py            # 1 GiB fp32 model + AdamW state (3 GiB to save), median of 3
    .venv/bin/python bench/save.py --quick    # 64 MiB model, one repetition (a smoke test: no timing claims)

Starts `torchrun --nproc_per_node 2` (gloo, CPU) and times, in one process group, on the same
model (fp32 Linear layers of 4096 x 4096 summing to --gb), after one AdamW step:

  DDP (accelerate, Accelerator(cpu=True)): every rank holds everything
    graft                 graft.checkpointing.save: every rank writes half (the replicated bytes split)
    rank-0 torch.save     torch.save({"model", "optimizer"}) on rank 0, fsynced
    accelerate save_state Accelerator.save_state, every written file fsynced
    floor: write halves   both ranks write their half of the same tensor bytes, write + fsync
  FSDP2 (fully_shard on a 1-D mesh): every rank holds half
    graft                 graft.checkpointing.save: every rank writes its shard
    dcp.save              torch.distributed.checkpoint.save of model + optimizer state dicts, fsynced
    rank-0 torch.save     full state gathered to rank 0 (get_*_state_dict full_state_dict, cpu_offload),
                          torch.save, fsynced
    floor: write halves   both ranks write their local shards' bytes, write + fsync
  Asynchronous saves (FSDP2), training going on until the commit:
    graft async           graft.Checkpointer(async_save=True).save, then wait() after the training steps
    dcp.async_save        torch.distributed.checkpoint.async_save (its own gloo group), then .result()
    per save: the time training is blocked, the time to the durable commit, extra anonymous memory
    per rank against the rank's own shard (the peak of one more save with no training beside it,
    plus memory the save keeps between saves: graft's reused snapshot buffer),
    and training throughput while the save is written
    against training with no save (a forward + backward of the model on 8 samples per step; the
    ranks agree after each step whether to go on, as a loop's stop() does). On 2 cores the
    writer threads compete with training for the CPU: that is what the throughput row shows.
  Resume, cold (the checkpoint's files dropped from the page cache first):
    graft 2 -> 2          the FSDP2 checkpoint restored into the FSDP2 run (same world size)
    graft 2 -> 1          the same checkpoint restored in one process (rank 0; another world size)
    floor: read 2 / 1     the same files read with pread into one buffer: both ranks their own
                          shard in parallel / rank 0 all of them

The peers do not fsync on their own; the benchmark fsyncs what they wrote inside their timed
region, since a checkpoint not on disk is not a checkpoint (graft fsyncs every file).

Per run: wall time of the slowest rank (barrier to barrier), bytes written to storage per
rank (/proc/self/io write_bytes), extra
anonymous memory per rank (peak RssAnon during the run over the level before, sampled every
2 ms: bench/procstats.py). The median of --reps runs, the ratios to the floors, then the
issue's targets as PASS/MISS. Quote ratios, not absolute times: the machine's disk and cores
set the latter, and on a shared machine the ratios are noise too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from procstats import PeakRss, drop_cache, launch_workers, written_bytes

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
ROWS = COLS = 4096  # one 64 MiB fp32 weight per layer


def n_layers(gb: float) -> int:
    return max(1, round(gb * 2**30 / (ROWS * COLS * 4)))


def build(layers: int, rows: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(COLS, rows, bias=False) for _ in range(layers)])


def adamw_step(model) -> object:
    """An AdamW optimizer with state (one step on random gradients): what a checkpoint saves."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else ([path] if path.exists() else [])


def fsync_all(path: Path) -> None:
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_floor(path: Path, tensors, rank: int, world: int, replicated: bool) -> None:
    """The floor: this rank's half of the bytes (replicated: a byte range of their concatenation;
    sharded: its own tensors), written straight from memory, fsynced."""
    from graft.loading.formats.reading import writable_buffer

    views = [writable_buffer(t.contiguous()) for t in tensors]
    total = sum(len(v) for v in views)
    lo, hi = (rank * total // world, (rank + 1) * total // world) if replicated else (0, total)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        at = 0
        for v in views:
            a, b = max(lo, at), min(hi, at + len(v))
            for off in range(a - at, b - at, 16 << 20):
                piece = v[off: min(b - at, off + (16 << 20))]
                done = 0
                while done < len(piece):
                    done += os.write(fd, piece[done:])
            at += len(v)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_floor(files: list[Path], buf) -> None:
    from graft.loading.formats.reading import writable_buffer

    view = writable_buffer(buf)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            off = 0
            while n := os.preadv(fd, [view], off):
                off += n
        finally:
            os.close(fd)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from graft.checkpointing import layout
    from graft.checkpointing.restore import restore
    from graft.checkpointing.save import save
    from graft.checkpointing.torch_adapter import TorchAdapter

    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Path(args.work) / f"rank{rank}"
    shared = Path(args.work) / "shared"
    records: list[dict] = []
    buf = torch.empty(64 << 20, dtype=torch.uint8)

    def timed(name: str, fn, out: Path | None, reps: int, before=None) -> None:
        for rep in range(reps + 1):  # rep 0: untimed warm-up (imports, first calls)
            if out is not None and rank == 0 and out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            if before is not None:
                before()
            gc.collect()
            dist.barrier()
            wrote = written_bytes()
            with PeakRss() as peak:
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                seconds = time.perf_counter() - t0
            mine = {"seconds": seconds, "anon": peak.extra_anon, "written": written_bytes() - wrote}
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            if rank == 0 and rep > 0:
                rec = {"method": name, "rep": rep, "ranks": gathered, "wall": max(g["seconds"] for g in gathered)}
                records.append(rec)
                print(f"  rep {rep} {name:36s} {rec['wall']:7.3f} s", flush=True)
        dist.barrier()

    work.mkdir(parents=True, exist_ok=True)
    shared.mkdir(parents=True, exist_ok=True)

    # -- DDP -------------------------------------------------------------------------------
    model = build(args.layers, ROWS)
    opt = adamw_step(model)
    model, opt = acc.prepare(model, opt)
    inner, torch_opt = acc.unwrap_model(model), opt.optimizer
    tensors = [*inner.state_dict().values(), *[v for s in torch_opt.state.values() for v in s.values()]]

    def graft_ddp():
        save(shared / "graft_ddp", "epoch_000001", TorchAdapter(inner, torch_opt, "ddp"))

    def torch_save_ddp():
        if rank == 0:
            f = shared / "torch_ddp.pt"
            torch.save({"model": inner.state_dict(), "optimizer": torch_opt.state_dict()}, f)
            fsync_all(f)

    def accelerate_ddp():
        acc.save_state(str(shared / "accelerate_ddp"))
        fsync_all(shared / "accelerate_ddp")  # every rank: the files it wrote, and rank 0's

    def floor_ddp():
        write_floor(work / "floor_ddp.bin", tensors, rank, world, replicated=True)

    timed("graft (ddp)", graft_ddp, shared / "graft_ddp", args.reps)
    timed("rank-0 torch.save (ddp)", torch_save_ddp, shared / "torch_ddp.pt", args.reps)
    timed("accelerate save_state (ddp)", accelerate_ddp, shared / "accelerate_ddp", args.reps)
    timed("floor: write halves (ddp)", floor_ddp, None, args.reps)
    model = opt = inner = torch_opt = tensors = None  # the DDP copy goes before the FSDP2 one comes
    acc.free_memory()
    gc.collect()

    # -- FSDP2 -----------------------------------------------------------------------------
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from graft.wrapping import wrap_fsdp2

    model = wrap_fsdp2(build(args.layers, ROWS))
    opt = adamw_step(model)
    local = [t.to_local() for t in [*model.state_dict().values(), *[v for s in opt.state.values() for v in s.values()]]
             if hasattr(t, "to_local")]

    def graft_fsdp2():
        save(shared / "graft_fsdp2", "epoch_000001", TorchAdapter(model, opt, "fsdp2"))

    def dcp_fsdp2():
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=str(shared / "dcp_fsdp2"))
        fsync_all(shared / "dcp_fsdp2")

    def torch_save_fsdp2():
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {"model": get_model_state_dict(model, options=o), "optim": get_optimizer_state_dict(model, opt, options=o)}
        if rank == 0:
            torch.save(state, shared / "torch_fsdp2.pt")
            fsync_all(shared / "torch_fsdp2.pt")
        del state

    def floor_fsdp2():
        write_floor(work / "floor_fsdp2.bin", local, rank, world, replicated=False)

    timed("graft (fsdp2)", graft_fsdp2, shared / "graft_fsdp2", args.reps)
    timed("dcp.save (fsdp2)", dcp_fsdp2, shared / "dcp_fsdp2", args.reps)
    timed("rank-0 torch.save gathered (fsdp2)", torch_save_fsdp2, shared / "torch_fsdp2.pt", args.reps)
    timed("floor: write halves (fsdp2)", floor_fsdp2, None, args.reps)
    async_records = async_saves(model, opt, shared, rank, world, args.reps)

    # -- resume (cold) ---------------------------------------------------------------------
    ckpt = shared / "graft_fsdp2" / "checkpoints" / "epoch_000001"
    save(shared / "graft_fsdp2", "epoch_000001", TorchAdapter(model, opt, "fsdp2"))
    shard_files = [ckpt / layout.shard_file(r) for r in range(world)]
    cold = lambda: drop_cache(files_under(ckpt))  # noqa: E731
    timed("graft resume 2 -> 2 (fsdp2)", lambda: restore(ckpt, TorchAdapter(model, opt, "fsdp2")), None, args.reps,
          before=cold)
    timed("floor: read 2 (own shard)", lambda: read_floor([shard_files[rank]], buf), None, args.reps, before=cold)
    single = build(args.layers, ROWS) if rank == 0 else None
    single_opt = torch.optim.AdamW(single.parameters(), lr=1e-4) if rank == 0 else None

    def resume_one():
        if rank == 0:
            restore(ckpt, TorchAdapter(single, single_opt, "single"))

    timed("graft resume 2 -> 1 (one process)", resume_one, None, args.reps, before=cold)
    timed("floor: read 1 (all shards)", lambda: read_floor(shard_files, buf) if rank == 0 else None, None,
          args.reps, before=cold)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"records": records, "async": async_records}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def async_saves(model, opt, shared: Path, rank: int, world: int, reps: int) -> list[dict]:
    """graft's asynchronous save and dcp.async_save on the FSDP2 model, training on until each commits."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    import graft
    from graft.checkpointing.preempt import max_over_ranks

    x = torch.randn(8, COLS)

    def train_step() -> None:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    def steps_while(going) -> tuple[int, float]:
        """Train until no rank is `going` any more (agreed after every step); (steps, seconds)."""
        t0, n = time.perf_counter(), 0
        while True:
            train_step()
            n += 1
            if not max_over_ranks([int(going(time.perf_counter() - t0))])[0]:
                return n, time.perf_counter() - t0

    steps_while(lambda s: s < 0.5)  # warm-up
    n, sec = steps_while(lambda s: s < 2.0)
    no_save = n / sec
    ckpt = graft.Checkpointer(shared / "graft_async", model=model, optimizer=opt, async_save=True, lock=False)
    side = dist.new_group(backend="gloo")  # dcp's thread gets a group of its own, as graft's does
    pending: dict = {}

    def graft_start(rep: int) -> int:
        return ckpt.save(epoch=rep + 1, step=rep + 1).bytes_per_rank[rank]

    def dcp_start(rep: int) -> int:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        pending["future"] = dcp.async_save(state, checkpoint_id=str(shared / "dcp_async"), process_group=side)
        return sum(t.to_local().nbytes if hasattr(t, "to_local") else 0 for t in _tensors(state))

    def dcp_finish() -> None:
        pending.pop("future").result()
        fsync_all(shared / "dcp_async")

    # Memory: one more save of each, with no training beside it (training's own transient memory
    # would blur the peak), plus what a save keeps between saves (graft's reused snapshot buffer,
    # resident since rep 0); dcp's default stager copies anew each time.
    held = {"graft async (fsdp2)": lambda: ckpt.writer.snapshot.buf.numel() if ckpt.writer.snapshot.buf is not None
            else 0, "dcp.async_save (fsdp2)": lambda: 0}
    methods = {
        "graft async (fsdp2)": (shared / "graft_async", graft_start, lambda: ckpt.writer.writing, ckpt.wait),
        "dcp.async_save (fsdp2)": (shared / "dcp_async", dcp_start, lambda: not pending["future"].done(), dcp_finish),
    }
    out = []
    for name, (where, start, writing, finish) in methods.items():
        for rep in range(reps + 1):  # rep 0: untimed warm-up (and the first allocation of staging memory)
            if rank == 0 and where.exists():
                shutil.rmtree(where)
            gc.collect()
            dist.barrier()
            t0 = time.perf_counter()
            shard = start(rep)
            blocked = time.perf_counter() - t0
            steps, sec = steps_while(lambda _: writing())
            finish()
            commit = time.perf_counter() - t0
            with PeakRss() as peak:
                start(rep)
                finish()
            mine = {"blocked": blocked, "commit": commit, "anon": held[name]() + peak.extra_anon, "shard": shard,
                    "rate": steps / sec, "no_save_rate": no_save}
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            if rank == 0 and rep > 0:
                out.append({"method": name, "rep": rep, "ranks": gathered})
                print(f"  rep {rep} {name:36s} blocked {max(g['blocked'] for g in gathered):7.3f} s, commit "
                      f"{max(g['commit'] for g in gathered):7.3f} s", flush=True)
            dist.barrier()
    ckpt.close()
    dist.destroy_process_group(side)
    return out


def _tensors(tree) -> list:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return [tree] if hasattr(tree, "shape") else []


def summarise_async(data: dict, sync_save: float) -> list[str]:
    records = data.get("async") or []
    if not records:
        return []

    def med(m, key, rank=None):
        vals = [max(g[key] for g in r["ranks"]) if rank is None else r["ranks"][rank][key]
                for r in records if r["method"] == m]
        return statistics.median(vals) if vals else float("nan")

    def worst(m, rank, key):
        return max(r["ranks"][rank][key] for r in records if r["method"] == m)

    lines = ["", "| async method | blocked s per save | s to durable commit | extra anon MiB r0 / r1 | "
                 "own shard MiB r0 / r1 | training steps/s during the save, x no save |", "|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["method"] for r in records):
        rate = min(med(m, "rate", r) / med(m, "no_save_rate", r) for r in (0, 1))
        lines.append(f"| {m} | {med(m, 'blocked'):.3f} | {med(m, 'commit'):.3f} | "
                     f"{worst(m, 0, 'anon') / 2**20:.0f} / {worst(m, 1, 'anon') / 2**20:.0f} | "
                     f"{worst(m, 0, 'shard') / 2**20:.0f} / {worst(m, 1, 'shard') / 2**20:.0f} | {rate:.2f} |")
    g, d = "graft async (fsdp2)", "dcp.async_save (fsdp2)"
    blocked = med(g, "blocked")
    rate = min(med(g, "rate", r) / med(g, "no_save_rate", r) for r in (0, 1))
    over = [worst(g, r, "anon") / worst(g, r, "shard") for r in (0, 1)]
    slack = max(worst(g, r, "anon") - worst(g, r, "shard") for r in (0, 1))
    verdicts = [
        (f"graft async blocked time at most 20% of graft's synchronous save ({blocked:.3f} s vs {sync_save:.3f} s: "
         f"{blocked / sync_save:.0%})", blocked <= 0.2 * sync_save),
        (f"graft async blocked time at or below dcp.async_save's ({blocked:.3f} s vs {med(d, 'blocked'):.3f} s)",
         blocked <= med(d, "blocked")),
        (f"graft async extra memory per rank at most its own shard, + 1 MiB for metadata and the writer "
         f"thread ({over[0]:.3f}x / {over[1]:.3f}x, {slack / 2**20:+.2f} MiB)", slack <= 2**20),
        (f"training throughput during a background save within 15% of no save ({rate:.2f}x; 2 cores shared with "
         f"the writer)", rate >= 0.85),
    ]
    return [*lines, "", *[f"{'PASS' if ok else 'MISS'}  {text}" for text, ok in verdicts]]


def summarise(data: dict, state_bytes: int) -> str:
    records = data["records"]

    def med(m):
        vals = [r["wall"] for r in records if r["method"] == m]
        return statistics.median(vals) if vals else float("nan")

    def worst(m, rank, key):
        return max((r["ranks"][rank][key] for r in records if r["method"] == m), default=0)

    floors = {"ddp": med("floor: write halves (ddp)"), "fsdp2": med("floor: write halves (fsdp2)"),
              "2 -> 2": med("floor: read 2 (own shard)"), "2 -> 1": med("floor: read 1 (all shards)")}
    floor_key = {"graft resume 2 -> 2 (fsdp2)": "2 -> 2", "floor: read 2 (own shard)": "2 -> 2",
                 "graft resume 2 -> 1 (one process)": "2 -> 1", "floor: read 1 (all shards)": "2 -> 1"}

    def floor_of(m):
        return floors[floor_key.get(m, "ddp" if "(ddp)" in m else "fsdp2")]

    lines = ["| method | wall s (slowest rank, median) | x floor | MB written r0 / r1 | extra anon MiB r0 / r1 |",
             "|---|---|---|---|---|"]
    for m in dict.fromkeys(r["method"] for r in records):
        lines.append(f"| {m} | {med(m):.3f} | {med(m) / floor_of(m):.2f} | "
                     f"{worst(m, 0, 'written') / 1e6:.0f} / {worst(m, 1, 'written') / 1e6:.0f} | "
                     f"{worst(m, 0, 'anon') / 2**20:.0f} / {worst(m, 1, 'anon') / 2**20:.0f} |")
    verdicts = []
    for kind in ("ddp", "fsdp2"):
        g = med(f"graft ({kind})")
        verdicts.append((f"graft save ({kind}) within 1.15x of the parallel-write floor ({g / floors[kind]:.2f}x)",
                         g <= 1.15 * floors[kind]))
        b = [worst(f"graft ({kind})", r, "written") for r in (0, 1)]
        even = all(abs(x - sum(b) / 2) <= 0.1 * sum(b) / 2 for x in b)
        verdicts.append((f"graft ({kind}) bytes per rank within 10% of total / N ({b[0] / 1e6:.0f} / "
                         f"{b[1] / 1e6:.0f} MB)", even))
    g, d = med("graft (fsdp2)"), med("dcp.save (fsdp2)")
    verdicts.append((f"graft save (fsdp2) at or below dcp.save ({g:.3f} s vs {d:.3f} s)", g <= d))
    for k, m in (("2 -> 2", "graft resume 2 -> 2 (fsdp2)"), ("2 -> 1", "graft resume 2 -> 1 (one process)")):
        verdicts.append((f"{m} within 1.3x of the read floor ({med(m) / floors[k]:.2f}x)", med(m) <= 1.3 * floors[k]))
    lines.append("")
    lines += [f"{'PASS' if ok else 'MISS'}  {text}" for text, ok in verdicts]
    lines += summarise_async(data, med("graft (fsdp2)"))
    lines.append(f"(state saved: {state_bytes / 2**30:.2f} GiB of weights and AdamW moments)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="fp32 model size in GiB (default 1; 3x that is saved)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported (default 3)")
    ap.add_argument("--quick", action="store_true", help="64 MiB model, one repetition")
    ap.add_argument("--dir", help="where checkpoints go (default bench/out/save-work; its disk is measured)")
    if "GRAFT_BENCH_WORKER" in os.environ:
        return worker(argparse.Namespace(**json.loads(os.environ["GRAFT_BENCH_WORKER"])))
    args = ap.parse_args()
    if args.quick:
        args.gb, args.reps = 1 / 16, 1
    layers = n_layers(args.gb)
    work = Path(args.dir) if args.dir else OUT / "save-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = OUT / f"save-{layers}x64MB.json"
    state = 3 * layers * ROWS * COLS * 4
    print(f"model {layers * ROWS * COLS * 4 / 2**30:.2f} GiB ({layers} layers) + AdamW state: {state / 2**30:.2f} GiB to "
          f"save; reps {args.reps}; 2 processes, gloo on CPU; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; checkpoints in {work}", flush=True)
    try:
        launch_workers(__file__, {"layers": layers, "work": str(work), "out": str(out), "reps": args.reps})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(summarise(json.loads(out.read_text()), state))


if __name__ == "__main__":
    main()
