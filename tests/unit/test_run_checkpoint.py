"""Run checkpoints: the codec without pickle, atomic commit, manifest checks, rotation, the reader."""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import graft
from graft.config import ScheduleConfig
from graft.errors import CheckpointError
from graft.loading.formats import READERS
from graft.loading.formats.graft_run import GraftRun, sort_key
from graft.models import tiny_vgg
from graft.trainer import checkpoint as ck
from graft.trainer.schedule import Schedule
from graft.trainer.state import EpochBatchSampler, capture_rng, restore_rng


class Stage(enum.IntEnum):
    two = 2


def test_codec_round_trips_optimizer_like_trees(tmp_path):
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 5)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "fused": None}],
            "stage": Stage.two, "dtype": torch.bfloat16, "flat": [torch.arange(3)]}
    ck.save_tree(tmp_path, "opt", tree)
    back = ck.load_tree(tmp_path, "opt")
    assert back["param_groups"] == tree["param_groups"] and back["stage"] is Stage.two
    assert back["dtype"] is torch.bfloat16 and list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert torch.equal(back["flat"][0], tree["flat"][0])
    with pytest.raises(TypeError, match="without pickle"):
        ck.encode({"x": object()}, {})


def _commit(run_dir, name, epoch=1, value=1.0):
    a = ck.AtomicCheckpoint(run_dir, name, is_main=True)
    tmp = a.begin()
    ck.write_safetensors(tmp / ck.MODEL, {"w": torch.full((3,), value)})
    ck.write_json(tmp / ck.TRAIN_STATE, {"epoch": epoch})
    return a.commit({"epoch": epoch, "step": epoch})


def test_commit_is_atomic_and_manifest_checks_sizes_and_hashes(tmp_path):
    final = _commit(tmp_path, "epoch_000001")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch_000001"]
    manifest = json.loads((final / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "train_state.json"}
    assert ck.problem(final) is None
    text = (final / "train_state.json").read_text()
    (final / "train_state.json").write_text(text.replace("1", "9"))  # same size, other bytes
    assert "sha256" in ck.problem(final)
    assert ck.problem(final, hashes=False) is None
    (final / "train_state.json").write_text(text.replace("1", "10"))
    assert "bytes" in ck.problem(final, hashes=False)


def test_find_resume_skips_incomplete_and_corrupt_naming_them(tmp_path):
    _commit(tmp_path, "epoch_000001", 1)
    _commit(tmp_path, "epoch_000002", 2)
    bad = _commit(tmp_path, "epoch_000003", 3)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    half = tmp_path / "checkpoints" / "epoch_000003_step_000040"
    half.mkdir()
    (tmp_path / "checkpoints" / ".tmp-epoch_000004").mkdir()
    folder, skipped = ck.find_resume(tmp_path)
    assert folder.name == "epoch_000002"
    assert [(p.name, "manifest" in why or "sha256" in why) for p, why in skipped] == [
        ("epoch_000003_step_000040", True), ("epoch_000003", True)]
    assert ck.clean_leftovers(tmp_path) == [".tmp-epoch_000004"]


def test_find_resume_with_nothing_valid_says_so(tmp_path):
    (tmp_path / "checkpoints" / "epoch_000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint.*epoch_000001: has no manifest"):
        ck.find_resume(tmp_path)


def test_rotation_keeps_the_newest_and_never_the_new_one(tmp_path):
    for e in range(1, 5):
        final = _commit(tmp_path, f"epoch_{e:06d}", e)
        ck.rotate(tmp_path, 2, final)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch_000003", "epoch_000004"]
    # Resumed from an older checkpoint, the run writes an older name: that new one stays.
    old = _commit(tmp_path, "epoch_000002", 2)
    ck.rotate(tmp_path, 1, old)
    assert (tmp_path / "checkpoints" / "epoch_000002").is_dir()
    assert (tmp_path / "checkpoints" / "epoch_000004").is_dir()


def test_names_sort_by_progress():
    names = ["epoch_000006", "epoch_000005_step_000123", "epoch_000005", "epoch_000000_step_000004"]
    assert sorted(names, key=sort_key) == ["epoch_000000_step_000004", "epoch_000005",
                                           "epoch_000005_step_000123", "epoch_000006"]


def test_graft_open_reads_a_run_folder_and_a_checkpoint(tmp_path):
    assert READERS[0] is GraftRun
    model = tiny_vgg()
    for e in (1, 2):
        a = ck.AtomicCheckpoint(tmp_path, f"epoch_{e:06d}", is_main=True)
        ck.write_safetensors(a.begin() / ck.MODEL, {k: v + e for k, v in model.state_dict().items()})
        a.commit({"epoch": e, "step": e})
    (tmp_path / "checkpoints" / "epoch_000003").mkdir()  # incomplete: not picked
    with graft.open(tmp_path) as c:
        assert c.format == "graft" and c.info()["epoch"] == 2 and c.source == "checkpoints/epoch_000002"
    other = tiny_vgg()
    report = graft.load(other, tmp_path / "checkpoints/epoch_000001", verbose=False)
    assert not report.new
    assert torch.equal(other.features[0].weight, model.features[0].weight + 1)
    with pytest.raises(CheckpointError, match="not a complete run checkpoint"):
        GraftRun(tmp_path / "checkpoints" / "epoch_000003", None)


def test_graft_open_checks_a_run_folder_as_resume_does(tmp_path, caplog):
    """A same-size swapped file in the newest checkpoint: graft.open / graft.load of the run folder
    fall back to the checkpoint --resume auto picks, and say so; the cheaper check is explicit."""
    model = tiny_vgg()
    for e in (1, 2):
        a = ck.AtomicCheckpoint(tmp_path, f"epoch_{e:06d}", is_main=True)
        tmp = a.begin()
        ck.write_safetensors(tmp / ck.MODEL, {k: v + e for k, v in model.state_dict().items()})
        ck.write_json(tmp / ck.TRAIN_STATE, {"epoch": e})
        a.commit({"epoch": e, "step": e})
    root = tmp_path / "checkpoints"
    # epoch 1's weights copied over epoch 2's: same size, so only the hashes can tell.
    shutil.copyfile(root / "epoch_000001" / ck.MODEL, root / "epoch_000002" / ck.MODEL)
    resumed, _ = ck.find_resume(tmp_path)
    with caplog.at_level(logging.WARNING, logger="graft.loading.formats.graft_run"):
        with graft.open(tmp_path) as c:
            info = c.info()
    assert Path(info["checkpoint"]) == resumed == root / "epoch_000001"
    assert info["verified"] == "sha256" and info["verify_seconds"] >= 0
    assert info["skipped"] == {"epoch_000002": "model.safetensors does not match its sha256 in the manifest (corrupt)"}
    assert "skipping checkpoint" in caplog.text and "epoch_000002" in caplog.text
    other = tiny_vgg()
    graft.load(other, tmp_path, verbose=False)
    assert torch.equal(other.features[0].weight, model.features[0].weight + 1)  # epoch 1, as resume
    with pytest.raises(CheckpointError, match="epoch_000002: is not a complete run checkpoint: model.safetensors "
                                              "does not match its sha256"):
        graft.open(root / "epoch_000002")  # named directly: refused, as --resume PATH refuses it
    with graft.open(tmp_path, verify="sizes") as c:  # the documented cheaper check cannot see it
        assert c.info()["verified"] == "sizes" and c.info()["checkpoint"] == str(root / "epoch_000002")
    with pytest.raises(CheckpointError, match="verify='md5'"):
        graft.open(tmp_path, verify="md5")


def test_schedule_policies_and_state():
    cfg = ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.0)
    s = Schedule(cfg, [1.0], steps_per_epoch=10, total_steps=50)
    assert s.lrs(0) == [0.5] and s.lrs(1) == [1.0] and s.lrs(49)[0] < 0.01 and s.lrs(80) == s.lrs(50)
    state = s.state_dict()
    info = s.extend(50, 100, "restart")
    assert (info["lr_after"], s.lrs(51)[0]) == (0.5, 1.0) and s.lrs(49) == Schedule(cfg, [1.0], 10, 50).lrs(49)
    again = Schedule(cfg, [1.0], 10, 50)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert again.lrs(77) == s.lrs(77) and state["phases"][0]["curve_end"] == 50
    st = Schedule(cfg, [1.0], 10, 50)
    st.extend(50, 100, "stretch")
    assert st.lrs(60) == Schedule(cfg, [1.0], 10, 100).lrs(60)
    step = Schedule(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), [1.0], 10, 50)
    assert step.lrs(19) == [1.0] and step.lrs(20) == [0.5] and step.lrs(60) == [0.125]


def test_sampler_is_a_function_of_seed_epoch_and_position():
    a = EpochBatchSampler(50, 8, seed=1)
    a.set_epoch(3)
    full = list(a)
    a.set_epoch(3, start_batch=2)
    assert list(a) == full[2:]
    a.set_epoch(4)
    assert list(a) != full
    r0, r1 = (EpochBatchSampler(50, 8, seed=1, rank=r, world_size=2) for r in (0, 1))
    i0, i1 = r0.indices(), r1.indices()
    assert len(i0) == len(i1) == 25 and not set(i0) & set(i1)


def test_rng_capture_restore_round_trip():
    import random

    import numpy as np

    meta, tensors = capture_rng()
    meta = json.loads(json.dumps(meta))
    want = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng(meta, tensors)
    assert (random.random(), np.random.rand(), torch.rand(1)) == want


def test_digits_data_is_real_and_split_deterministically():
    from graft.config import DataConfig
    from graft.data import build_datasets

    a = build_datasets(DataConfig(image_size=32), seed=0)
    b = build_datasets(DataConfig(image_size=32), seed=0)
    x, y = a.train[0]
    assert x.shape == (3, 32, 32) and a.num_classes == 10 and len(a.train) + len(a.val) == 1797
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert set(a.train.tensors[1].tolist()) == set(range(10))


def test_imagefolder_gets_the_same_transforms(tmp_path):
    from PIL import Image

    from graft.config import DataConfig
    from graft.data import build_datasets

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("L" if i else "RGB", (20 + i, 17)).save(tmp_path / c / f"{i}.png")
    s = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, val_fraction=0.34), seed=0)
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and s.classes == ["cat", "dog"] and len(s.train) + len(s.val) == 6


def test_sigusr1_and_sigterm_set_the_preempt_flag():
    import signal

    from graft.trainer.preempt import PreemptFlag

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        flag = PreemptFlag().install()
        try:
            assert not flag.should_stop()
            os.kill(os.getpid(), sig)
            assert flag.should_stop() and flag.name == sig.name
        finally:
            flag.uninstall()
