"""`graft plot`: a PNG from metrics.jsonl, with the resume points where the run picked up.
The plot of a real (trained, resumed) run is in tests/e2e/test_resume.py."""

from __future__ import annotations

import json

import pytest

from graft.launch.cli import main as graft_main
from graft.launch.plot import ema, plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, records, torn_tail: bool = False):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn_tail:
            f.write('{"event": "step", "epoch": 3, "st')  # a kill mid-write


def _synthetic_run(run_dir):
    """4 epochs of 5 steps; killed in epoch 3 after its checkpoint at epoch 2, resumed, then extended."""
    recs = []
    for step in range(1, 14):  # epochs 0-2, killed at step 13
        epoch = (step - 1) // 5
        recs.append({"event": "step", "epoch": epoch, "step": step, "loss": 2.0 / step, "lr": 1e-3})
        if step % 5 == 0:
            recs.append({"event": "epoch", "epoch": epoch + 1, "step": step, "loss": 1.0, "val_accuracy": 0.2 * (epoch + 1)})
            recs.append({"event": "save", "epoch": epoch + 1, "step": step})
    recs.append({"event": "resume", "epoch": 2, "step": 10, "checkpoint": "epoch_000002"})
    for step in range(11, 16):  # steps 11-13 again (work lost to the kill), then on
        recs.append({"event": "step", "epoch": 2, "step": step, "loss": 1.0 / step, "lr": 1e-3})
    recs.append({"event": "epoch", "epoch": 3, "step": 15, "loss": 0.5, "val_accuracy": 0.7})
    recs.append({"event": "resume", "epoch": 3, "step": 15, "checkpoint": "epoch_000003"})
    recs.append({"event": "extend", "epoch": 3, "step": 15, "policy": "stretch", "from_epochs": 3, "to_epochs": 4})
    for step in range(16, 21):
        recs.append({"event": "step", "epoch": 3, "step": step, "loss": 0.5 / step, "lr": 1e-4})
    recs.append({"event": "epoch", "epoch": 4, "step": 20, "loss": 0.1, "val_accuracy": 0.9})
    run_dir.mkdir(parents=True, exist_ok=True)
    _write(run_dir / "metrics.jsonl", recs, torn_tail=True)
    return recs


def test_read_metrics_keeps_the_last_record_of_each_step(tmp_path):
    _synthetic_run(tmp_path / "run")
    m = read_metrics(tmp_path / "run")
    assert [s["step"] for s in m.steps] == list(range(1, 21))
    assert m.steps[12]["loss"] == pytest.approx(1.0 / 13)  # the resumed run's step 13, not the lost one
    assert [e["epoch"] for e in m.epochs] == [1, 2, 3, 4]
    assert [r["step"] for r in m.resumes] == [10, 15]
    assert m.skipped_lines == 1


def test_plot_marks_resumes(tmp_path):
    _synthetic_run(tmp_path / "run")
    res = plot_run(tmp_path / "run")
    assert res.path == tmp_path / "run" / "curves.png"
    assert res.path.read_bytes()[:8] == PNG_MAGIC
    assert res.resume_steps == [10, 15]
    assert (res.n_steps, res.n_epochs) == (20, 4)
    assert res.final_val_accuracy == pytest.approx(0.9)


def test_plot_cli(tmp_path, capsys):
    _synthetic_run(tmp_path / "run")
    out = tmp_path / "figs" / "c.png"
    assert graft_main(["plot", str(tmp_path / "run"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "resumed at step(s) [10, 15]" in text and "90.0%" in text


def test_plot_without_metrics_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no metrics file"):
        graft_main(["plot", str(tmp_path)])


def test_ema_is_debiased():
    assert ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
