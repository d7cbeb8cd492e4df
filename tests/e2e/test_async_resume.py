"""Asynchronous save (train.async_save / Checkpointer(async_save=True)), one process: the checkpoints
are bitwise the synchronous ones, the resumed run is bitwise the straight one, the snapshot is the
state at the save point although training changes the tensors at once, the staging buffer is reused,
and SIGTERM while a background write is in flight drains it, commits, exits 0 and resumes exactly.
The 2-process cases are in tests/distributed/test_async_save.py; faults in test_async_faults.py.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import graft
from graft.checkpointing import layout
from graft.checkpointing.restore import read_logical
from graft.trainer import run
from launch import REPO
from run_helpers import events, run_and_sigterm, state_differences, step_lines, tiny_config, tiny_overrides

pytestmark = pytest.mark.e2e
ASYNC = "train.async_save=true"


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    """The synchronous run that never stopped: 4 epochs."""
    out = tmp_path_factory.mktemp("sync")
    return out, run(tiny_config(out, "train.epochs=4"))


def test_async_checkpoints_equal_sync_ones_and_half_plus_resume_equals_straight(sync_run, tmp_path):
    ref, ref_summary = sync_run
    straight = run(tiny_config(tmp_path / "straight", "train.epochs=4", ASYNC))
    first = run(tiny_config(tmp_path / "resumed", "train.epochs=4", "train.session_epochs=2", ASYNC))
    assert first["epochs_done"] == 2 and first["checkpoint"].endswith("epoch_000002")  # committed before return
    second = run(tiny_config(tmp_path / "resumed", "train.epochs=4", ASYNC), resume="auto")
    assert second["resumed_from"].endswith("epoch_000002") and second["finished"]
    for epoch in (1, 2, 3, 4):  # step k of the async run == step k of the sync run, bitwise
        name = f"checkpoints/epoch_{epoch:06d}"
        assert not state_differences(tmp_path / "straight" / name, ref / name), name
        if epoch >= 2:
            assert not state_differences(tmp_path / "resumed" / name, ref / name), name
    a, b, c = step_lines(ref), step_lines(tmp_path / "straight"), step_lines(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 17))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a] == [c[s]["loss"] for s in a]
    assert straight["val_accuracy"] == second["val_accuracy"] == ref_summary["val_accuracy"]
    assert all(e["background"] for e in events(tmp_path / "straight", "save"))
    assert not [p for p in (tmp_path / "straight" / "checkpoints").iterdir() if p.name.startswith(".")]


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt)
    return model, opt


def _step(model, opt) -> None:
    """A training step: changes every weight and optimizer moment in place."""
    model(torch.randn(8, 1024)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _logical(model, opt) -> dict[str, torch.Tensor]:
    out = {layout.model_name(k): v.clone() for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, s in opt.state.items():
        for k, v in s.items():
            out[f"optim/{names[p]}/{k}"] = v.clone()
    return out


def test_snapshot_is_the_state_at_the_save_point_and_the_buffer_is_reused(tmp_path, caplog):
    model, opt = _model()
    expected = []
    with caplog.at_level(logging.INFO, logger="graft.checkpointing"), \
            graft.Checkpointer(tmp_path, model=model, optimizer=opt, async_save=True, keep_last=2) as ckpt:
        for epoch in (1, 2, 3):
            expected.append(_logical(model, opt))
            result = ckpt.save(epoch=epoch, step=epoch)
            assert result.background and result.folder.name == layout.checkpoint_name(epoch)
            # Training goes on at once: the next steps change every saved tensor while it is written
            # (not after save 2: save 3 comes at once, and must wait for save 2's commit).
            for _ in range(3 if epoch != 2 else 0):
                _step(model, opt)
            buffer = ckpt.writer.snapshot.buf.data_ptr()
        ckpt.wait()
        assert ckpt.last_saved.name == "epoch_000003"
        assert ckpt.writer.snapshot.allocations == 1 and ckpt.writer.snapshot.buf.data_ptr() == buffer
        # The staging area is this rank's shard (one process: everything it writes, RNG states
        # included), no more: each piece rounded up to 64 bytes.
        shard = result.bytes_per_rank[0]
        assert sum(t.numel() * t.element_size() for t in expected[-1].values()) < shard
        assert shard <= ckpt.writer.snapshot.buf.numel() <= shard + 64 * 64
    assert "waited" in caplog.text and "for the previous save (epoch_000002) to commit" in caplog.text
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch_000002", "epoch_000003"]  # keep_last=2, rotated after each commit
    for epoch, want in ((2, expected[1]), (3, expected[2])):
        m = layout.read_manifest(tmp_path / "checkpoints" / layout.checkpoint_name(epoch))
        for name, t in want.items():
            assert torch.equal(read_logical(m, name).reshape(t.shape), t), (epoch, name)


def test_sigterm_during_a_background_write_then_resume_equals_never_stopped(tmp_path):
    # A wider classifier (about 50 MB to save) so the background write of epoch 1 lasts long enough
    # for the signal to land in it; the signal is sent as soon as that save is submitted.
    extra = ["train.epochs=2", "train.max_steps_per_epoch=null", "data.limit=400", "data.batch_size=16",
             "model.kwargs={hidden: 2048}"]
    ref = tmp_path / "ref"
    run(tiny_config(ref, *extra))  # synchronous, never stopped
    out = tmp_path / "stopped"
    cmd = [sys.executable, str(REPO / "train.py"), *tiny_overrides(out, *extra, ASYNC)]
    metrics = out / "metrics.jsonl"
    # SIGTERM right after the save event of epoch 1, while its files are still being written.
    output = run_and_sigterm(cmd, lambda: metrics.exists() and '"save"' in metrics.read_text(), poll=0.002)
    # The stop's save came while epoch 1 was still being written: it waited for that commit first.
    assert "for the previous save (epoch_000001) to commit" in output, output
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved[0] == "epoch_000001" and len(saved) == 2 and "_step_" in saved[1], saved
    for name in saved:  # both committed before the exit
        assert layout.problem(out / "checkpoints" / name, hashes=True) is None
    summary = run(tiny_config(out, *extra, ASYNC), resume="auto")
    assert summary["finished"] and "_step_" in summary["resumed_from"]
    for name in ("epoch_000001", "epoch_000002"):
        assert not state_differences(out / "checkpoints" / name, ref / "checkpoints" / name), name
    a, b = step_lines(ref), step_lines(out)
    assert sorted(a) == sorted(b)
    assert [a[s]["loss"] for s in sorted(a)] == [b[s]["loss"] for s in sorted(a)]
