"""DeepSpeed ZeRO folders written by a real 2-process run, read back into a changed model.

One torchrun launch writes stages 1, 2 and 3 (DeepSpeed's start-up is paid once); every
test then reads those folders. The ground truth is what the writer itself held after
training (expected.pt), never values computed by the reader.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graft
from graft.errors import CheckpointError
from graft.loading.formats.deepspeed_folder import MASTER
from checks import changed_model
from launch import child_env, run, torchrun

pytestmark = pytest.mark.distributed

SCRIPTS = Path(__file__).parent / "scripts"
STAGES = (1, 2, 3)
# Stage 0 (ZeRO off: the module holds everything, no optimizer shards) costs the writer
# a few seconds more and covers the reader's fallback to the module copy.
WRITTEN = (0, *STAGES)
TAG = "global_step3"  # the writer trains 3 steps and lets DeepSpeed name the tag
# checks.changed_model's arguments here: a new block in front (rnn3) and a resized head (5 -> 7
# classes) on the writer's BatchNorm model.
CHANGED = dict(seed=1, batch_norm=True)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    torchrun(SCRIPTS / "deepspeed_write.py", out, *WRITTEN, timeout=600)
    return out


def expected(folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    saved = torch.load(folder / "expected.pt", weights_only=True)
    return saved["state_dict"], saved["frozen"]


@pytest.mark.parametrize("stage", STAGES)
def test_metadata_without_reading_weights(written, stage):
    folder = written / f"stage{stage}"
    want, frozen = expected(folder)
    with graft.open(folder) as ckpt:
        assert ckpt.format == "deepspeed"
        info = ckpt.info()
        assert (info["tag"], info["step"], info["world_size"], info["zero_stage"]) == (TAG, 3, 2, stage)
        assert set(ckpt.keys()) == set(want)
        for key, value in want.items():
            m = ckpt.meta(key)
            assert (m.shape, m.dtype) == (tuple(value.shape), value.dtype), key
        assert ckpt.bytes_read == 0
        # Trainable parameters from the fp32 master partitions; frozen ones (which
        # DeepSpeed's zero_to_fp32 drops at stage 1) and buffers from the module's copy.
        sources = info["weights_from"]
        trainable = [k for k in want if k.endswith(("weight", "bias")) and k not in frozen]
        assert sorted(sources[MASTER]) == sorted(trainable)
        others = [k for origin, keys in sources.items() if origin != MASTER for k in keys]
        assert set(frozen) <= set(others)
        assert MASTER in ckpt.source
        json.dumps(info)  # crosses process boundaries and lands in JSON reports


@pytest.mark.parametrize("stage", WRITTEN)
def test_changed_model_loads_writer_weights(written, stage):
    folder = written / f"stage{stage}"
    want, frozen = expected(folder)
    model = changed_model(**CHANGED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = graft.load(model, folder, freeze="loaded", progress=False, verbose=False)

    assert sorted(report.new) == ["rnn3.0.bias", "rnn3.0.weight"]
    assert sorted(report.mismatched) == ["classifier.6.bias", "classifier.6.weight"]
    assert set(report.unexpected) == set(report.mismatched)  # the old head feeds nothing
    state = model.state_dict()
    for key in report.loaded:
        assert torch.equal(state[key], want[key]), key
    for key in (*report.new, *report.mismatched):
        assert torch.equal(state[key], before[key]), key
    assert set(frozen) <= set(report.loaded)  # the stage-1 frozen params came through
    # Only the planned tensors were read: nothing of the skipped head, no whole shard.
    assert report.bytes_read == sum(want[k].numel() * want[k].element_size() for k in report.loaded)
    # freeze="loaded": exactly the new and mismatched parameters stay trainable.
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(k for k in (*report.new, *report.mismatched))


def test_stage0_reads_the_module_copy(written):
    with graft.open(written / "stage0") as ckpt:
        assert ckpt.info()["zero_stage"] == 0
        assert list(ckpt.info()["weights_from"]) == ["module copy (mp_rank_00_model_states.pt)"]


def test_tag_folder_and_explicit_tag(written):
    folder = written / "stage3"
    want, _ = expected(folder)
    for ckpt in (graft.open(folder / TAG), graft.open(folder, tag=TAG)):
        with ckpt:
            assert ckpt.format == "deepspeed" and ckpt.info()["tag"] == TAG
            key = "classifier.6.bias"  # 5 values over 2 ranks: the padded slice
            assert torch.equal(ckpt.tensor(key), want[key])
    with pytest.raises(CheckpointError, match="global_step7"):
        graft.open(folder, tag="global_step7")


def test_agrees_with_deepspeeds_own_converter(written):
    """Where DeepSpeed's zero_to_fp32 returns a tensor, it is ours, bit for bit; at stage 1
    it loses the frozen parameters we keep. Run apart: this test process never imports
    deepspeed."""
    code = textwrap.dedent(f"""
        import torch, graft
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        for stage in {STAGES}:
            folder = {str(written)!r} + f"/stage{{stage}}"
            theirs = get_fp32_state_dict_from_zero_checkpoint(folder)
            frozen = torch.load(folder + "/expected.pt", weights_only=True)["frozen"]
            with graft.open(folder) as ckpt:
                assert set(theirs) <= set(ckpt.keys()), set(theirs) - set(ckpt.keys())
                for k, v in theirs.items():
                    assert torch.equal(ckpt.tensor(k), v.contiguous()), (stage, k)
                dropped = sorted(set(ckpt.keys()) - set(theirs))
            assert dropped == (sorted(frozen) if stage == 1 else []), (stage, dropped)
        print("AGREE")
    """)
    proc = run([sys.executable, "-c", code], env=child_env(), timeout=300)
    assert "AGREE" in proc.stdout


def test_reads_where_deepspeed_cannot_be_imported(written):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["deepspeed"] = None  # `import deepspeed` now raises ImportError
        try:
            import deepspeed
        except ImportError:
            pass
        else:
            raise SystemExit("deepspeed is importable")
        import torch, graft
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})  # tests/ (checks)
        from checks import changed_model
        for stage in {STAGES}:
            folder = {str(written)!r} + f"/stage{{stage}}"
            want = torch.load(folder + "/expected.pt", weights_only=True)["state_dict"]
            model = changed_model(**{CHANGED!r})
            report = graft.load(model, folder, freeze="loaded", progress=False, verbose=False)
            assert len(report.loaded) == len(want) - 2, report.loaded
            state = model.state_dict()
            for k in report.loaded:
                assert torch.equal(state[k], want[k]), (stage, k)
        assert "deepspeed" not in {{m.split(".")[0] for m, v in sys.modules.items() if v is not None}}
        print("READ WITHOUT DEEPSPEED")
    """)
    proc = run([sys.executable, "-c", code], env=child_env(), timeout=300)
    assert "READ WITHOUT DEEPSPEED" in proc.stdout


def untouched(folder: Path, match: str) -> None:
    model = changed_model(**CHANGED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        graft.load(model, folder, freeze="loaded", progress=False, verbose=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("stage", STAGES)
def test_missing_rank_shard(written, tmp_path, stage):
    folder = tmp_path / f"stage{stage}"
    shutil.copytree(written / f"stage{stage}", folder)
    missing = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (folder / TAG / missing).unlink()
    untouched(folder, missing)


def test_latest_names_missing_tag(written, tmp_path):
    folder = tmp_path / "stage2"
    shutil.copytree(written / "stage2", folder)
    (folder / "latest").write_text("global_step9")
    untouched(folder, "global_step9")
