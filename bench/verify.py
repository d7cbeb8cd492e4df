#!/usr/bin/env python
"""What checking a run checkpoint costs: graft.open(RUN_DIR) with verify="sha256" (the default,
the rule --resume auto uses: every file's hash, BLAKE3 in version-2 manifests) against
verify="sizes", and the machine's hash rates.

A run checkpoint of about --gb GB (weights plus AdamW-like state twice their size) is written
by the trainer's own sharded writer (one process), then timed:

  sha256 memory   hashlib.sha256 over an in-memory buffer (no I/O; version-1 manifests)
  blake3 memory   blake3 over the same buffer (no I/O; what version-2 manifests use)
  hash warm       graft.open(RUN_DIR) with every file in the page cache (hash + reads)
  hash cold       the same after posix_fadvise(DONTNEED) on every file (hash + storage reads)
  sizes           graft.open(RUN_DIR, verify="sizes"): manifest and stat() only

Run:  .venv/bin/python bench/verify.py            (~3 GB checkpoint, 3 runs each)
      .venv/bin/python bench/verify.py --quick    (0.15 GB, 1 run each, for development)
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import graft  # noqa: E402
from graft.checkpointing import layout  # noqa: E402
from graft.checkpointing.save import save  # noqa: E402
from graft.checkpointing.torch_adapter import TorchAdapter  # noqa: E402
from procstats import drop_cache  # noqa: E402


def write_run(run_dir: Path, gb: float) -> list[Path]:
    """One complete checkpoint: model (gb/3) + optimizer state (2 gb/3), written and committed."""
    model_numel = int(gb * 1e9 / 3 / 4)
    rows = max(1, model_numel // 4096)
    model = torch.nn.Linear(4096, rows, bias=False)
    opt = torch.optim.AdamW(model.parameters())
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    final = save(run_dir, layout.checkpoint_name(1), TorchAdapter(model, opt, "single"),
                 info={"epoch": 1, "step": 1}).folder
    return sorted(p for p in final.rglob("*") if p.is_file())


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=3.0, help="checkpoint size in GB (model + optimizer)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="0.15 GB, 1 run: proves the script works")
    p.add_argument("--dir", help="where to write the checkpoint (default: a temp folder; its disk is measured)")
    args = p.parse_args()
    if args.quick:
        args.gb, args.runs = 0.15, 1
    root = Path(tempfile.mkdtemp(prefix="graft-bench-verify-", dir=args.dir))
    try:
        files = write_run(root, args.gb)
        total = sum(f.stat().st_size for f in files)
        buf = bytes(256 << 20) if not args.quick else bytes(32 << 20)
        mem = timed(lambda: hashlib.sha256(buf).hexdigest(), args.runs)
        mem_b3 = timed(lambda: layout.new_hasher("blake3").update(buf), args.runs)

        def open_run(verify: str) -> None:
            with graft.open(root, verify=verify) as c:
                assert c.info()["verified"] == verify

        open_run("sha256")  # warm the page cache
        warm = timed(lambda: open_run("sha256"), args.runs)

        def cold() -> None:
            drop_cache(files)
            open_run("sha256")

        cold_s = timed(cold, args.runs)
        sizes = timed(lambda: open_run("sizes"), args.runs)
        gbs = total / 1e9
        print(f"checkpoint {gbs:.2f} GB in {len(files)} files ({root})")
        print(f"{'check':<16}{'seconds':>10}{'GB/s':>8}")
        print(f"{'sha256 memory':<16}{mem:>10.3f}{len(buf) / 1e9 / mem:>8.2f}")
        print(f"{'blake3 memory':<16}{mem_b3:>10.3f}{len(buf) / 1e9 / mem_b3:>8.2f}")
        print(f"{'hash warm':<16}{warm:>10.3f}{gbs / warm:>8.2f}")
        print(f"{'hash cold':<16}{cold_s:>10.3f}{gbs / cold_s:>8.2f}")
        print(f"{'sizes':<16}{sizes:>10.4f}{'-':>8}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
