"""Run checkpoints: the codec without pickle, the sharded save and its commit, manifest checks,
rotation, the reader, the restore into fresh optimizers."""

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
from graft.checkpointing import codec, layout
from graft.checkpointing.atomic import clean_leftovers, rotate
from graft.checkpointing.restore import read_logical, restore
from graft.checkpointing.save import quotas, save, share
from graft.checkpointing.slices import whole
from graft.checkpointing.torch_adapter import TorchAdapter
from graft.config import ScheduleConfig
from graft.errors import CheckpointError
from graft.loading.formats import READERS
from graft.loading.formats.graft_run import GraftRun
from graft.models import tiny_vgg
from graft.sampler import EpochSampler
from graft.checkpointing.checkpointer import pick
from graft.trainer.schedule import Schedule
from graft.checkpointing.rng import capture_rng, restore_rng


class Stage(enum.IntEnum):
    two = 2


def test_codec_round_trips_optimizer_like_trees():
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 5)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "fused": None}],
            "stage": Stage.two, "dtype": torch.bfloat16, "flat": [torch.arange(3)]}
    tensors: dict = {}
    meta = json.loads(json.dumps(codec.encode(tree, tensors)))
    back = codec.decode(meta, tensors)
    assert back["param_groups"] == tree["param_groups"] and back["stage"] is Stage.two
    assert back["dtype"] is torch.bfloat16 and list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert torch.equal(back["flat"][0], tree["flat"][0])
    with pytest.raises(TypeError, match="without pickle"):
        codec.encode({"x": object()}, {})


class _Weights(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), value))


def _commit(run_dir, name, epoch=1, value=1.0):
    result = save(run_dir, name, TorchAdapter(_Weights(value), None, "single"),
                  files={layout.TRAIN_STATE: {"epoch": epoch}}, info={"epoch": epoch, "step": epoch})
    return result.folder


def test_commit_is_atomic_and_manifest_checks_sizes_and_hashes(tmp_path):
    final = _commit(tmp_path, "epoch_000001")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch_000001"]
    manifest = json.loads((final / "manifest.json").read_text())
    assert set(manifest["files"]) == {"shards/rank_00000.safetensors", "train_state.json", "state.json"}
    assert manifest["version"] == 2 and manifest["world_size"] == 1 and manifest["strategy"] == "single"
    assert all(f["algo"] == "blake3" for f in manifest["files"].values())
    assert layout.problem(final) is None
    text = (final / "train_state.json").read_text()
    (final / "train_state.json").write_text(text.replace("1", "9"))  # same size, other bytes
    assert "blake3" in layout.problem(final)
    assert layout.problem(final, hashes=False) is None
    (final / "train_state.json").write_text(text.replace("1", "10"))
    assert "bytes" in layout.problem(final, hashes=False)


def test_the_shard_is_a_plain_safetensors_file_hashed_while_written(tmp_path):
    from safetensors import safe_open

    model = tiny_vgg()
    final = save(tmp_path, "epoch_000001", TorchAdapter(model, None, "single")).folder
    m = layout.read_manifest(final)
    shard = final / layout.shard_file(0)
    assert m.files[layout.shard_file(0)].hash == layout.hash_file(shard)
    with safe_open(str(shard), "pt") as f:
        for fqn, t in model.state_dict().items():
            assert torch.equal(f.get_tensor(layout.piece_key("model/" + fqn, 0, t.numel())).reshape(t.shape), t)


def test_a_missing_rank_shard_is_never_complete(tmp_path):
    final = _commit(tmp_path, "epoch_000001")
    raw = json.loads((final / "manifest.json").read_text())
    raw["world_size"] = 2  # a manifest that claims a second rank whose file it does not list
    (final / "manifest.json").write_text(json.dumps(raw))
    assert "rank_00001" in layout.problem(final, hashes=False)
    raw["world_size"] = 1
    (final / "manifest.json").write_text(json.dumps(raw))
    os.unlink(final / layout.shard_file(0))
    assert "rank_00000.safetensors is missing" in layout.problem(final, hashes=False)


def test_find_resume_skips_incomplete_and_corrupt_naming_them(tmp_path):
    _commit(tmp_path, "epoch_000001", 1)
    _commit(tmp_path, "epoch_000002", 2)
    bad = _commit(tmp_path, "epoch_000003", 3)
    with open(bad / layout.shard_file(0), "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    half = tmp_path / "checkpoints" / "epoch_000003_step_000040"
    half.mkdir()
    (tmp_path / "checkpoints" / ".tmp-epoch_000004").mkdir()
    folder, skipped = layout.newest_complete(tmp_path)
    assert folder.name == "epoch_000002"
    assert [(p.name, "manifest" in why or "blake3" in why) for p, why in skipped] == [
        ("epoch_000003_step_000040", True), ("epoch_000003", True)]
    assert pick(tmp_path, "auto").name == "epoch_000002"  # and it removes the leftover temp folder
    assert clean_leftovers(tmp_path) == []


def test_find_resume_with_nothing_valid_says_so(tmp_path):
    (tmp_path / "checkpoints" / "epoch_000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint.*epoch_000001: has no manifest"):
        pick(tmp_path, "auto")


def test_rotation_keeps_the_newest_and_never_the_new_one(tmp_path):
    for e in range(1, 5):
        final = _commit(tmp_path, f"epoch_{e:06d}", e)
        rotate(tmp_path, 2, final)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch_000003", "epoch_000004"]
    # Resumed from an older checkpoint, the run writes an older name: that new one stays.
    old = _commit(tmp_path, "epoch_000002", 2)
    rotate(tmp_path, 1, old)
    assert (tmp_path / "checkpoints" / "epoch_000002").is_dir()
    assert (tmp_path / "checkpoints" / "epoch_000004").is_dir()


def test_names_sort_by_progress():
    names = ["epoch_000006", "epoch_000005_step_000123", "epoch_000005", "epoch_000000_step_000004"]
    assert sorted(names, key=layout.sort_key) == ["epoch_000000_step_000004", "epoch_000005",
                                                  "epoch_000005_step_000123", "epoch_000006"]


def test_graft_open_reads_a_run_folder_and_a_checkpoint(tmp_path):
    assert READERS[0] is GraftRun
    model = tiny_vgg()
    for e in (1, 2):
        shifted = tiny_vgg()
        shifted.load_state_dict({k: v + e for k, v in model.state_dict().items()})
        save(tmp_path, f"epoch_{e:06d}", TorchAdapter(shifted, None, "single"), info={"epoch": e, "step": e})
    (tmp_path / "checkpoints" / "epoch_000003").mkdir()  # incomplete: not picked
    with graft.open(tmp_path) as c:
        info = c.info()
        assert c.format == "graft" and info["epoch"] == 2 and c.source.startswith("checkpoints/epoch_000002")
        assert info["world_size"] == 1 and info["strategy"] == "single" and info["layout"]["kind"] == "sharded"
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
        shifted = tiny_vgg()
        shifted.load_state_dict({k: v + e for k, v in model.state_dict().items()})
        save(tmp_path, f"epoch_{e:06d}", TorchAdapter(shifted, None, "single"), info={"epoch": e, "step": e})
    root = tmp_path / "checkpoints"
    shard = layout.shard_file(0)
    # epoch 1's weights copied over epoch 2's: same size, so only the hashes can tell.
    shutil.copyfile(root / "epoch_000001" / shard, root / "epoch_000002" / shard)
    resumed = pick(tmp_path, "auto")
    with caplog.at_level(logging.WARNING, logger="graft.loading.formats.graft_run"):
        with graft.open(tmp_path) as c:
            info = c.info()
    assert Path(info["checkpoint"]) == resumed == root / "epoch_000001"
    assert info["verified"] == "sha256" and info["verify_seconds"] >= 0
    assert info["skipped"] == {"epoch_000002": f"{shard} does not match its blake3 in the manifest (corrupt)"}
    assert "skipping checkpoint" in caplog.text and "epoch_000002" in caplog.text
    other = tiny_vgg()
    graft.load(other, tmp_path, verbose=False)
    assert torch.equal(other.features[0].weight, model.features[0].weight + 1)  # epoch 1, as resume
    with pytest.raises(CheckpointError, match=f"epoch_000002: is not a complete run checkpoint: {shard} "
                                              "does not match its blake3"):
        graft.open(root / "epoch_000002")  # named directly: refused, as --resume PATH refuses it
    with graft.open(tmp_path, verify="sizes") as c:  # the documented cheaper check cannot see it
        assert c.info()["verified"] == "sizes" and c.info()["checkpoint"] == str(root / "epoch_000002")
    with pytest.raises(CheckpointError, match="verify='md5'"):
        graft.open(tmp_path, verify="md5")


def test_graft_open_still_reads_version_1_checkpoints(tmp_path):
    """A checkpoint written before sharded saves: model.safetensors + a sha256 manifest."""
    import hashlib

    from safetensors.torch import save_file

    model = tiny_vgg()
    folder = tmp_path / "checkpoints" / "epoch_000001"
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "manifest.json").write_text(json.dumps({
        "format": "graft-run-checkpoint", "version": 1, "epoch": 1, "step": 4,
        "files": {"model.safetensors": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))
    other = tiny_vgg()
    report = graft.load(other, tmp_path, verbose=False)
    assert not report.new and torch.equal(other.features[0].weight, model.features[0].weight)
    with graft.open(tmp_path) as c:
        assert c.info()["manifest_version"] == 1 and c.info()["layout"]["kind"] == "gathered"


def _trained(optim_cls=torch.optim.AdamW, steps=3, **kw):
    torch.manual_seed(0)
    model = tiny_vgg()
    model.features[0].weight.requires_grad_(False)  # a frozen parameter: no optimizer state
    opt = optim_cls([p for p in model.parameters() if p.requires_grad], **kw)
    for _ in range(steps):
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("optim_cls, kw", [(torch.optim.AdamW, {"lr": 1e-3, "betas": (0.8, 0.95)}),
                                           (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                           (torch.optim.Adam, {"lr": 1e-3, "amsgrad": True})])
def test_restore_into_a_fresh_optimizer_equals_load_state_dict(tmp_path, optim_cls, kw):
    model, opt = _trained(optim_cls, **kw)
    final = save(tmp_path, "epoch_000001", TorchAdapter(model, opt, "single")).folder
    torch.manual_seed(1)
    fresh = tiny_vgg()
    fresh.features[0].weight.requires_grad_(False)
    fresh_opt = optim_cls([p for p in fresh.parameters() if p.requires_grad], **{**kw, "lr": 0.5})  # no state
    restore(final, TorchAdapter(fresh, fresh_opt, "single"))
    # What torch's own load_state_dict makes of the same state, for comparison.
    ref = tiny_vgg()
    ref.load_state_dict(model.state_dict())
    ref_opt = optim_cls([p for n, p in ref.named_parameters() if n != "features.0.weight"], **{**kw, "lr": 0.5})
    ref_opt.load_state_dict(opt.state_dict())
    for (k, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    got, want = fresh_opt.state_dict(), ref_opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"])
    for i, st in want["state"].items():
        assert sorted(st) == sorted(got["state"][i])
        for k, v in st.items():
            g = got["state"][i][k]
            assert g.dtype == v.dtype and g.device == v.device and g.shape == v.shape and torch.equal(g, v), (i, k)


def test_restore_refuses_a_checkpoint_that_does_not_fit_and_changes_nothing(tmp_path):
    model, opt = _trained()
    final = save(tmp_path, "epoch_000001", TorchAdapter(model, opt, "single")).folder
    other = tiny_vgg(num_classes=7)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="epoch_000001.*classifier"):
        restore(final, TorchAdapter(other, torch.optim.AdamW(other.parameters()), "single"))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    sgd = torch.optim.SGD([p for n, p in model.named_parameters() if n != "features.0.weight"], lr=0.1,
                          momentum=0.9)
    with pytest.raises(CheckpointError, match="does not fit the optimizer"):
        restore(final, TorchAdapter(model, sgd, "single"))


def test_replicated_bytes_are_split_evenly_and_exactly_once():
    hs = [whole(f"model/t{i}", torch.arange(n, dtype=torch.float32), replicated=True)
          for i, n in enumerate([7, 1000, 3, 0, 250])]
    total = sum(h.nbytes for h in hs)
    for own in ([0, 0], [0, 0, 0], [4000, 0, 0], [100, 900, 0]):
        q = quotas(own, total)
        assert sum(q) == total
        covered = {h.name: [] for h in hs}
        for r in range(len(own)):
            for piece in share(hs, q, r):
                covered[piece.name].append((piece.start, piece.stop))
                assert torch.equal(piece.local, torch.arange(piece.start, piece.stop, dtype=torch.float32))
        for h in hs:  # every element exactly once
            spans = sorted(covered[h.name])
            assert sum(b - a for a, b in spans) == h.numel and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
        per = [o + sum(p.nbytes for p in share(hs, q, r)) for r, o in enumerate(own)]
        assert max(per) - min(per) <= max(max(own) - (sum(own) + total) / len(own), 0) * 2 + 4 * 4


def test_logical_tensors_read_back_whole(tmp_path):
    model, opt = _trained()
    m = layout.read_manifest(save(tmp_path, "epoch_000001", TorchAdapter(model, opt, "single")).folder)
    p = model.classifier[6].weight
    assert torch.equal(read_logical(m, "model/classifier.6.weight"), p)
    assert torch.equal(read_logical(m, "optim/classifier.6.weight/exp_avg"), opt.state[p]["exp_avg"])


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
    a = EpochSampler(50, 8, seed=1)
    a.set_epoch(3)
    full = list(a)
    a.set_epoch(3, position=16)
    assert list(a) == full[2:]
    a.set_epoch(4)
    assert list(a) != full
    r0, r1 = (EpochSampler(50, 8, seed=1, rank=r, world_size=2) for r in (0, 1))
    i0, i1 = r0.indices(), r1.indices()
    assert len(i0) == len(i1) == 25 and not set(i0) & set(i1)


def _old_batches(n, bs, seed, epoch, rank, world, start_batch):
    """The trainer's sampler before global positions (per-rank batch index): the same-world
    continuation must stay exactly this."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per = n // world
    mine = perm[: per * world][rank::world]
    return [mine[b * bs:(b + 1) * bs] for b in range(start_batch, -(-per // bs))]


@pytest.mark.parametrize("n, bs, world", [(50, 8, 2), (61, 4, 3), (240, 16, 2), (7, 3, 1)])
def test_sampler_same_world_size_is_the_old_per_rank_order(n, bs, world):
    for start in range(0, -(-(n // world) // bs)):
        for rank in range(world):
            s = EpochSampler(n, bs, seed=5, rank=rank, world_size=world)
            s.set_epoch(2, position=start * bs * world)
            assert list(s) == _old_batches(n, bs, 5, 2, rank, world, start)


@pytest.mark.parametrize("n, bs, first, then, steps", [(100, 4, 2, 3, 5), (100, 4, 3, 1, 4), (61, 5, 2, 3, 3),
                                                       (61, 5, 1, 2, 12)])
def test_sampler_continues_at_the_global_sample_at_another_world_size(n, bs, first, then, steps):
    seen = []
    for rank in range(first):
        s = EpochSampler(n, bs, seed=9, rank=rank, world_size=first)
        s.set_epoch(0)
        seen += [i for b in list(s)[:steps] for i in b]
    position = EpochSampler(n, bs, seed=9, world_size=first).position_after(steps)
    assert position == len(seen)
    tail = None
    for rank in range(then):
        s = EpochSampler(n, bs, seed=9, rank=rank, world_size=then)
        s.set_epoch(0, position)
        seen += s.indices()
        tail = s.tail()
        assert len(s) == s.batches()  # every rank the same number of steps
    assert len(seen) == len(set(seen))  # no sample twice
    assert sorted(seen + tail) == list(range(n)) and len(tail) < then  # none skipped but the tail


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

    from graft.checkpointing.preempt import PreemptFlag

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        flag = PreemptFlag().install()
        try:
            assert not flag.should_stop()
            os.kill(os.getpid(), sig)
            assert flag.should_stop() and flag.name == sig.name
        finally:
            flag.uninstall()


def test_staged_paths_write_and_read_in_bounded_pieces(tmp_path):
    """Non-contiguous tensors take the staging path (the one GPU tensors take): the writer copies
    them through a buffer of `staging_bytes`, the restorer reads into one and copies out."""
    from safetensors import safe_open

    from graft.checkpointing.layout import FileEntry, Manifest, Piece, TensorEntry
    from graft.checkpointing.restore import read_ranges
    from graft.checkpointing.shard_writer import write_shard

    big = torch.arange(3000, dtype=torch.float32)
    strided = big[::3]  # 1000 elements, not contiguous
    w = write_shard(tmp_path / "s.safetensors", [("a", strided), ("b", big[:10].to(torch.bfloat16))],
                    staging_bytes=256)
    assert w.hash == layout.hash_file(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("a"), strided) and f.get_tensor("b").dtype == torch.bfloat16
    m = Manifest(tmp_path, 2, {"s.safetensors": FileEntry(w.size, w.hash, w.algo, 0)},
                 {"a": TensorEntry((1000,), torch.float32, [Piece("s.safetensors", w.offsets["a"], 0, 1000)])},
                 1, "single", {})
    dest = torch.zeros(2000)[::2]  # a non-contiguous destination: staged reads
    read_ranges(m, [("a", 100, 900, dest[100:900])], staging_bytes=200)
    assert torch.equal(dest[100:900], strided[100:900]) and not dest[:100].any() and not dest[900:].any()
