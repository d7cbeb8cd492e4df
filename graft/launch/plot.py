"""`graft plot RUN_DIR`: loss and validation accuracy curves of a run, resume points marked.

Reads RUN_DIR/metrics.jsonl, one JSON object per line with an "event":
"step" (step, epoch, loss, lr), "epoch" (epoch, step, val_accuracy), "resume", "extend"
(a resume that raised train.epochs: from_epochs, to_epochs, policy), "save", "preempt".
The x axis is the optimizer step, so the curves of a run that stopped and went
on join where they should; a resume is a vertical line labelled with its epoch (and, for an
extension, the new horizon and LR policy), and the learning rate, on a second axis, shows
what that policy did.

A run resumed from a checkpoint older than its last logged step repeats some steps; the
plot keeps the LAST record of each step and each epoch (the run as it went on), so the
curve shows what the final weights went through.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


@dataclass
class Metrics:
    """The records of one metrics file, by kind, in step order."""

    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)
    extends: list[dict] = field(default_factory=list)
    preempts: list[dict] = field(default_factory=list)
    skipped_lines: int = 0


@dataclass
class PlotResult:
    """What `plot_run` drew (the tests and the demo check these)."""

    path: Path
    """The PNG written."""
    resume_steps: list[int]
    """x positions (steps) of the resume lines, in order."""
    preempt_steps: list[int]
    n_steps: int
    """Step records drawn (one per logged step)."""
    n_epochs: int
    final_val_accuracy: float | None


def read_metrics(path: str | Path) -> Metrics:
    """Parse a metrics.jsonl (or the run folder holding one); later records of a step win."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {str(path)!r}: is it a run folder written by the trainer?")
    steps: dict[int, dict] = {}
    epochs: dict[int, dict] = {}
    m = Metrics()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # A process killed mid-write leaves a partial last line; the rest is still good.
                m.skipped_lines += 1
                continue
            event = rec.get("event")
            if event == "step" and "step" in rec and rec.get("loss") is not None:
                steps[int(rec["step"])] = rec
            elif event == "epoch" and "epoch" in rec:
                epochs[int(rec["epoch"])] = rec
            elif event == "resume":
                m.resumes.append(rec)
            elif event == "extend":
                m.extends.append(rec)
            elif event == "preempt":
                m.preempts.append(rec)
    m.steps = [steps[k] for k in sorted(steps)]
    m.epochs = [epochs[k] for k in sorted(epochs)]
    return m


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the start is not pulled to 0)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def _epoch_x(rec: dict, steps: list[dict]) -> float:
    """Where an epoch line sits on the step axis: its own step, else its epoch's last step line."""
    if rec.get("step") is not None:
        return float(rec["step"])
    last = [s["step"] for s in steps if s.get("epoch") == rec["epoch"]]
    return float(max(last)) if last else float("nan")


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, smooth: float = 0.9,
             title: str | None = None) -> PlotResult:
    """Draw RUN_DIR's loss (per step, raw and smoothed) and val accuracy (per epoch) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    m = read_metrics(run_dir)
    out = Path(out) if out is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / "curves.png"
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth={smooth}: expected 0 <= smooth < 1 (0 draws the raw loss only)")

    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
    xs = [int(s["step"]) for s in m.steps]
    losses = [float(s["loss"]) for s in m.steps]
    if xs:
        ax_loss.plot(xs, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss (per step)")
        # Few logged points (train.log_every > 1, short runs): a heavy EMA would only lag.
        weight = min(smooth, max(0.0, 1 - 10 / len(xs)))
        if weight > 0:
            ax_loss.plot(xs, ema(losses, weight), color="tab:blue", linewidth=1.6,
                         label=f"loss (EMA {weight:.2g})")
        if all(v > 0 for v in losses) and max(losses) / max(min(losses), 1e-12) > 30:
            ax_loss.set_yscale("log")
        lrs = [(x, float(s["lr"])) for x, s in zip(xs, m.steps) if isinstance(s.get("lr"), (int, float))]
        if lrs:
            # The LR shows what an extension policy did at a resume (continue / restart / stretch).
            ax_lr = ax_loss.twinx()
            ax_lr.plot([a for a, _ in lrs], [b for _, b in lrs], color="tab:gray", linewidth=1.0,
                       linestyle="-.", alpha=0.8, label="learning rate")
            ax_lr.set_ylabel("learning rate", color="tab:gray")
            ax_lr.tick_params(axis="y", colors="tab:gray", labelsize=8)
            ax_lr.set_ylim(bottom=0)
            ax_lr.legend(loc="center right", fontsize=8)
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)

    acc = [(_epoch_x(e, m.steps), float(e["val_accuracy"]), int(e["epoch"]))
           for e in m.epochs if e.get("val_accuracy") is not None]
    acc = [a for a in acc if not math.isnan(a[0])]
    if acc:
        ax_acc.plot([a[0] for a in acc], [a[1] for a in acc], marker="o", markersize=3,
                    color="tab:green", label="val accuracy (per epoch)")
        last = acc[-1]
        ax_acc.annotate(f"{last[1]:.1%} (epoch {last[2]})", (last[0], last[1]), textcoords="offset points",
                        xytext=(-4, -14), ha="right", fontsize=8, color="tab:green")
    ax_acc.set_ylabel("val accuracy")
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.grid(alpha=0.3)

    resume_steps = [int(r.get("step", 0)) for r in m.resumes]
    preempt_steps = [int(p.get("step", 0)) for p in m.preempts]
    extends = {int(e.get("step", -1)): e for e in m.extends}
    for i, (rec, x) in enumerate(zip(m.resumes, resume_steps)):
        label = f"resume @ epoch {rec.get('epoch', '?')}"
        ext = extends.get(x)
        if ext is not None:
            label += f", extended to {ext.get('to_epochs', '?')} epochs"
            if ext.get("policy"):
                label += f" (LR: {ext['policy']})"
        for ax in (ax_loss, ax_acc):
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1.2,
                       label="resume" if ax is ax_loss and i == 0 else None)
        ax_loss.text(x, 0.98, label, transform=ax_loss.get_xaxis_transform(), rotation=90, va="top",
                     ha="left", fontsize=8, color="tab:red",
                     bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
    for i, x in enumerate(preempt_steps):
        for ax in (ax_loss, ax_acc):
            ax.axvline(x, color="tab:orange", linestyle=":", linewidth=1.2,
                       label="stopped (preempted)" if ax is ax_loss and i == 0 else None)

    ax_loss.legend(loc="upper right", fontsize=8)
    if acc:
        ax_acc.legend(loc="lower right", fontsize=8)
    last_step = xs[-1] if xs else 0
    ax_loss.set_title(title or f"{run_dir.name}: {len(m.epochs)} epochs, {last_step} steps, "
                               f"{len(resume_steps)} resume(s)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return PlotResult(path=out, resume_steps=resume_steps, preempt_steps=preempt_steps, n_steps=len(xs),
                      n_epochs=len(m.epochs), final_val_accuracy=acc[-1][1] if acc else None)
