"""The whole torch-graft story on the CPU, in a few minutes (`make demo`).

1. Train a base model (tiny VGG) on scikit-learn's digits:      graft train
2. Change it: an `rnn3` block in front and a new head.
3. Dry run: what of the base checkpoint fits the changed model:  graft.plan
4. Load what fits and freeze it; only the new parts train:       graft.load(freeze="loaded")
5. Train the new parts for E epochs; the run stops at its end.   graft train
6. Extend it to 2E epochs, exactly where it stopped:              graft resume --epochs 2E
7. Final accuracy (asserted well above chance) and the curves:    graft plot

Training runs through the real launcher (`graft train` -> `accelerate launch -m graft.train`,
DDP over gloo with --nproc 2), so what you see is what a cluster job runs.

    python examples/demo.py                 # 2-4 minutes on 2 cores
    python examples/demo.py --quick         # the CI version: 1 process, fewer epochs
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`

CHANCE = 0.10  # ten digit classes
MIN_ACCURACY = 0.50  # "beats chance by a wide margin"
GRAFT_LR = 0.01
# On extension the LR schedule follows an explicit policy. "continue" would hold the LR at
# the end of its cosine (5% of the peak) for the added epochs; "stretch" recomputes the
# cosine for the new horizon, so the added epochs still learn.
POLICY = "stretch"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer epochs, one process (CI, tests)")
    p.add_argument("--out", default=str(REPO / "demo_out"), help="folder for the runs and the plot (wiped first)")
    p.add_argument("--nproc", type=int, help="training processes (default: 2, or 1 with --quick)")
    p.add_argument("--base-epochs", type=int, help="epochs of the base model (default 12, quick 5)")
    p.add_argument("--epochs", type=int, help="E: epochs of the grafted run before the extension to 2E "
                                              "(default 4, quick 2)")
    return p.parse_args()


def banner(n: int, text: str) -> None:
    print(f"\n{'=' * 88}\n[{n}] {text}\n{'=' * 88}", flush=True)


def child_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    # Each process gets its share of the cores: oversubscribed threads make gloo crawl.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def graft_cli(args: list[str], nproc: int) -> None:
    """Run `graft ARGS` as a user would (it prints the launcher command it runs); fail loudly."""
    print(f"$ graft {shlex.join(args)}", flush=True)
    t = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "graft.launch.cli", *args], cwd=REPO, env=child_env(nproc),
                         stdin=subprocess.DEVNULL)
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    if rc != 0:
        raise SystemExit(f"demo: `graft {args[0]}` failed with exit code {rc}")


def launch_options(nproc: int) -> list[str]:
    return ["--nproc", str(nproc)]  # the launcher picks a free rendezvous port on one machine


def epoch_accuracy(run_dir: Path) -> list[tuple[int, float]]:
    from graft.launch.plot import read_metrics

    return [(int(e["epoch"]), float(e["val_accuracy"])) for e in read_metrics(run_dir).epochs
            if e.get("val_accuracy") is not None]


def main() -> int:
    args = parse()
    nproc = args.nproc or (1 if args.quick else 2)
    base_epochs = args.base_epochs or (5 if args.quick else 12)
    E = args.epochs or (2 if args.quick else 4)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base_dir, graft_dir = out / "base", out / "graft"
    # A metrics line every step: smooth curves in the plot (train.log_every defaults to 10).
    quiet = ["train.log_every=1", *(["train.progress=false"] if args.quick else [])]
    t0 = time.perf_counter()
    print(f"torch-graft demo: {nproc} process(es) on the CPU, base {base_epochs} epochs, graft {E} -> {2 * E} "
          f"epochs, output in {out}")

    # 1 ------------------------------------------------------------------------------------
    banner(1, "train the base model (tiny VGG, 10 digit classes) and save its run checkpoints")
    graft_cli(["train", "--config", "configs/digits_base.yaml", *launch_options(nproc),
               f"train.out_dir={base_dir}", f"train.epochs={base_epochs}", *quiet], nproc)
    base_acc = epoch_accuracy(base_dir)[-1][1]
    print(f"base model: val accuracy {base_acc:.1%} after {base_epochs} epochs")

    # 2, 3 -----------------------------------------------------------------------------------
    import graft
    from graft.config import load_config
    from graft.trainer.loop import build_model

    # Only ~700 parameters train (rnn3 and the head), so a higher peak LR than the base's.
    graft_overrides = [f"init.checkpoint={base_dir}", f"train.out_dir={graft_dir}", f"train.epochs={E}",
                       f"optimizer.lr={GRAFT_LR}", *quiet]
    cfg = load_config(REPO / "configs" / "digits_graft.yaml", graft_overrides)
    banner(2, f"change the model: {cfg.model.factory} (rnn3 in front, a new head), "
              f"graft from the base run, exclude {cfg.init.exclude}")
    model = build_model(cfg)
    init = cfg.init
    with graft.open(base_dir) as ckpt:
        plan = graft.plan(model, ckpt, rename=[tuple(r) for r in init.rename], include=init.include,
                          exclude=init.exclude, on_mismatch=init.on_mismatch)
        print(plan)

    # 4 ------------------------------------------------------------------------------------
    banner(3, 'graft.load(model, base, freeze="loaded"): load what fits, freeze it')
    report = graft.load(model, base_dir, freeze="loaded", rename=[tuple(r) for r in init.rename],
                        include=init.include, exclude=init.exclude, on_mismatch=init.on_mismatch,
                        verbose=False, progress=False)
    print(report)
    trainable = [n for n, _ in graft.trainable_named_parameters(model)]
    n_train = sum(p.numel() for p in graft.trainable_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    print(f"trainable: {n_train:,} of {n_all:,} parameters: {', '.join(trainable)}")
    print("(the training run below does exactly this load itself, from init.* in its config)")

    # 5 ------------------------------------------------------------------------------------
    banner(4, f"train only the new parts for {E} epochs; the run ends at its horizon")
    graft_cli(["train", "--config", "configs/digits_graft.yaml", *launch_options(nproc), *graft_overrides], nproc)
    mid_acc = epoch_accuracy(graft_dir)[-1][1]
    print(f"grafted model: val accuracy {mid_acc:.1%} after {E} epochs")

    # 6 ------------------------------------------------------------------------------------
    banner(5, f"extend the finished run from {E} to {2 * E} epochs: resume where it stopped "
              f"(LR policy {POLICY!r})")
    graft_cli(["resume", str(graft_dir), "--epochs", str(2 * E), "--policy", POLICY,
               *launch_options(nproc)], nproc)
    accs = epoch_accuracy(graft_dir)
    last_epoch, final_acc = accs[-1]

    # 7 ------------------------------------------------------------------------------------
    banner(6, "curves")
    from graft.launch.plot import plot_run

    png = out / "graft_curves.png"
    res = plot_run(graft_dir, png, title=f"grafted model: {E} epochs, then extended to {2 * E}")
    base_png = plot_run(base_dir, out / "base_curves.png").path
    print(f"$ graft plot {graft_dir} -o {png}")
    print(f"plot written: {res.path} (resume marked at step(s) {res.resume_steps})")
    print(f"plot written: {base_png}")

    rows = [(f"base model, {base_epochs} epochs", f"{base_acc:.1%}"),
            (f"grafted, new parts only, {E} epochs", f"{mid_acc:.1%}"),
            (f"extended to {last_epoch} epochs (resumed, LR {POLICY})", f"{final_acc:.1%}"),
            ("chance (10 classes)", f"{CHANCE:.1%}")]
    print(f"\n{'=' * 88}\nREPORT: val accuracy")
    for what, acc in rows:
        print(f"  {what:48s} {acc:>6s}")
    print(f"  frozen from the base: {len(report.loaded)} tensors; trained: {', '.join(trainable)}")
    print(f"  plot: {res.path}")
    print(f"  total time: {time.perf_counter() - t0:.0f} s")
    ok = last_epoch == 2 * E and res.resume_steps and final_acc > MIN_ACCURACY
    if last_epoch != 2 * E:
        print(f"FAIL: the extended run ended at epoch {last_epoch}, not {2 * E}")
    if not res.resume_steps:
        print("FAIL: no resume recorded in the metrics")
    if final_acc <= MIN_ACCURACY:
        print(f"FAIL: final accuracy {final_acc:.1%} is not well above chance ({CHANCE:.0%}); need > "
              f"{MIN_ACCURACY:.0%}")
    if ok:
        print(f"OK: final accuracy {final_acc:.1%} > {MIN_ACCURACY:.0%} (chance {CHANCE:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
