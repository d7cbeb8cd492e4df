"""`graft convert` / `graft.convert` in one process: every target read back by its own
ecosystem's reader, the selection rules, bounded memory, and bad input that leaves nothing.
A full disk (a real tmpfs, and `graft convert` as a child process) is in tests/e2e/test_os_faults.py.

Checkpoints written by the distributed tools (DeepSpeed, FSDP2 + DCP, accelerate) are in
tests/distributed/test_convert_real.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_checks import OUT_NAME, TARGETS, assert_bitwise, bits, read_back
from huggingface_hub import save_torch_state_dict

import graft
from graft.conversion.stream import TensorStream
from graft.errors import CheckpointError, PlanError
from graft.launch.cli import main as graft_cli



def source_state() -> dict[str, torch.Tensor]:
    """Float, bf16, integer, bool, 0-dim and empty tensors: every case a writer must get right."""
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 16, generator=g),
        "layers.0.weight": torch.randn(16, 16, generator=g),
        "layers.0.bias": torch.randn(16, generator=g),
        "layers.1.weight": torch.randn(16, 16, generator=g).bfloat16(),
        "norm.num_batches_tracked": torch.tensor(17),
        "mask": torch.rand(5, 3, generator=g) > 0.5,
        "empty": torch.empty(0, 4),
        "head.weight": torch.randn(3, 16, generator=g).half(),
    }


@pytest.fixture(scope="module")
def ddp_pth(tmp_path_factory) -> Path:
    """A torch.save'd DDP state dict: every key under `module.`."""
    path = tmp_path_factory.mktemp("src") / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source_state().items()}, path)
    return path


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory) -> Path:
    """An HF sharded folder written by huggingface_hub itself (several shards + index)."""
    folder = tmp_path_factory.mktemp("hf_src")
    save_torch_state_dict(source_state(), folder, max_shard_size="3KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def convert(src, dst, to, **kw):
    return graft.convert(src, dst, to=to, progress=False, **kw)


@pytest.mark.parametrize("to", TARGETS)
def test_ddp_pth_to_every_target(ddp_pth, tmp_path, to):
    dst = tmp_path / OUT_NAME[to]
    report = convert(ddp_pth, dst, to, strip_prefix=True)
    assert report.selection.rules == ["stripped wrapper prefix 'module.' from 8 keys"]
    assert_bitwise(read_back(dst, to), source_state())
    assert report.bytes_written == sum(v.nbytes for v in source_state().values())
    assert [p.name for p in tmp_path.iterdir()] == [dst.name]  # no temporary left beside it


@pytest.mark.parametrize("to", TARGETS)
def test_hf_index_to_every_target_with_cast(hf_sharded, tmp_path, to):
    dst = tmp_path / OUT_NAME[to]
    report = convert(hf_sharded / "model.safetensors.index.json", dst, to, dtype="bf16")
    assert report.source_format == "hf-index"
    # Floats become bf16 (bits equal to torch's own cast); the int counter and the bool mask keep theirs.
    assert_bitwise(read_back(dst, to), source_state(), dtype=torch.bfloat16)
    assert report.selection.casts == {"float32 -> bfloat16": 4, "float16 -> bfloat16": 1}


def test_dcp_nested_under_model(ddp_pth, tmp_path):
    dst = tmp_path / "nested"
    convert(ddp_pth, dst, "dcp", strip_prefix="module.", dcp_key="model")
    assert_bitwise(read_back(dst, "dcp", dcp_key="model"), source_state())
    with graft.open(dst) as ckpt:  # graft itself sees the torchtitan-style nesting
        assert ckpt.source == "model"


def test_torch_file_is_mmap_loadable_and_aligned(ddp_pth, tmp_path):
    import zipfile

    dst = tmp_path / "out.pth"
    convert(ddp_pth, dst, "torch")
    assert_bitwise(torch.load(dst, weights_only=True, mmap=True), {f"module.{k}": v for k, v in source_state().items()})
    with zipfile.ZipFile(dst) as z:
        names = z.namelist()
        assert names[0] == "archive/data.pkl" and "archive/version" in names and "archive/byteorder" in names
        assert z.testzip() is None  # every CRC right
    with open(dst, "rb") as f:
        for info in zipfile.ZipFile(dst).infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


@pytest.mark.parametrize("to", ["torch", "dcp"])
def test_zip64_records_read_back(ddp_pth, tmp_path, monkeypatch, to):
    """Models over 4 GiB need zip64 sizes and offsets; forced here on every record, so that
    path is checked without writing 4 GiB: torch, Python's zipfile and graft all read it."""
    import zipfile

    import graft.conversion.writers.torch_zip as torch_zip

    monkeypatch.setattr(torch_zip, "ZIP64_FROM", 0)
    dst = tmp_path / OUT_NAME[to]
    convert(ddp_pth, dst, to)
    written = read_back(dst, to)
    assert_bitwise(written, {f"module.{k}": v for k, v in source_state().items()})
    if to == "torch":
        with zipfile.ZipFile(dst) as z:
            assert z.testzip() is None and all(i.file_size == i.compress_size for i in z.infolist())
            assert any(i.extra[:2] == b"\x01\x00" for i in z.infolist())  # the zip64 field is there
    with graft.open(dst) as ckpt:  # graft's own reader too (for DCP it strips the `module.` it finds)
        assert [bits(ckpt.tensor(k)).equal(bits(t))
                for k, t in zip(sorted(ckpt.keys()), [written[k] for k in sorted(written)])] == [True] * len(written)


def test_transformers_from_pretrained(tmp_path):
    """A tiny BERT's weights saved as a DDP .pth, converted to hf: transformers loads them as they were."""
    import transformers

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "bert.pth")
    out = tmp_path / "bert_hf"
    report = convert(tmp_path / "bert.pth", out, "hf", strip_prefix=True, max_shard_size="20KB")
    assert len(report.files) > 1
    config.save_pretrained(out)
    loaded = transformers.BertModel.from_pretrained(out).eval()
    for key, value in state.items():
        assert torch.equal(bits(loaded.state_dict()[key]), bits(value)), key
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_selection_rules(ddp_pth, tmp_path):
    dst = tmp_path / "sel.safetensors"
    report = convert(ddp_pth, dst, "safetensors", strip_prefix=True, rename=[(r"\.layers\.", ".blocks.")],
                     include=["blocks.*", "embed.*"], exclude=["*.bias"])
    want = source_state()
    expected = {"embed.weight": want["embed.weight"], "blocks.0.weight": want["layers.0.weight"],
                "blocks.1.weight": want["layers.1.weight"]}
    assert_bitwise(read_back(dst, "safetensors"), expected)
    assert report.selection.dropped["module.layers.0.bias"] == "excluded by '*.bias'"
    assert report.selection.dropped["module.mask"] == "not matched by include"
    # The core's order: renames see the checkpoint's own keys, then the wrapper prefix goes.
    assert report.selection.rules == ["rename '\\\\.layers\\\\.' -> '.blocks.' on 3 checkpoint keys",
                                      "stripped wrapper prefix 'module.' from 8 keys"]


def test_automatic_strip_leaves_a_real_namespace(tmp_path):
    # `model.` on some keys only (an HF causal LM: model.layers..., lm_head): not a wrapper.
    torch.save({"model.layer.weight": torch.ones(2), "lm_head.weight": torch.zeros(2)}, tmp_path / "lm.pth")
    report = convert(tmp_path / "lm.pth", tmp_path / "lm.safetensors", "safetensors", strip_prefix=True, dry_run=True)
    assert [t.name for t in report.selection.tensors] == ["model.layer.weight", "lm_head.weight"]


def test_collision_is_refused(ddp_pth, tmp_path):
    with pytest.raises(PlanError, match="both become"):
        convert(ddp_pth, tmp_path / "x.pth", "torch", rename=[(r"layers\.\d", "layers.N")])
    with pytest.raises(PlanError, match="nothing to write"):
        convert(ddp_pth, tmp_path / "x.pth", "torch", include=["nope.*"])
    assert list(tmp_path.iterdir()) == []


def test_bounded_buffer_many_batches(ddp_pth, tmp_path):
    """A buffer smaller than the model: batches of tensors through one allocation, still exact."""
    largest = max(v.nbytes for v in source_state().values())
    # The arena is the largest tensor plus the buffer: with 1 KiB smaller than the model, so
    # the ring wraps while the reader runs ahead of the writer; with 5 KiB the whole model.
    for i, buffer_mb in enumerate((1 / 1024, 5 / 1024)):
        dst = tmp_path / f"small{i}.safetensors"
        report = convert(ddp_pth, dst, "safetensors", strip_prefix=True, buffer_mb=buffer_mb)
        assert report.buffer_bytes <= largest + buffer_mb * 2**20 + 128
        assert_bitwise(read_back(dst, "safetensors"), source_state())
    with graft.open(ddp_pth) as ckpt:
        sel = graft.conversion.select.select(ckpt)
        stream = TensorStream(ckpt, sel.tensors, buffer_bytes=1 << 30)
        assert stream.capacity < 2 * sum(t.nbytes for t in sel.tensors)  # never more than the model needs


def test_dry_run_writes_nothing(hf_sharded, tmp_path, capsys):
    dst = tmp_path / "dry"
    assert graft_cli(["convert", str(hf_sharded), str(dst), "--to", "hf", "--max-shard-size", "2KB", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "would write" in text and "model-00001-of-" in text and "embed.weight (64, 16) float32" in text
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    assert graft_cli(["convert", str(hf_sharded), str(dst), "--to", "torch", "--dry-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dry_run"] and data["tensors"] == 8 and data["keys"]["mask"]["dtype"] == "bool"


def test_existing_dst_refused_then_forced(ddp_pth, tmp_path, capsys):
    for to in ("torch", "hf"):
        dst = tmp_path / OUT_NAME[to]
        if to == "hf":
            dst.mkdir()
            (dst / "keep.txt").write_text("mine")
        else:
            dst.write_bytes(b"mine")
        assert graft_cli(["convert", str(ddp_pth), str(dst), "--to", to]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("graft: error:") and "already exists" in err[0]
        assert (dst / "keep.txt").read_text() == "mine" if to == "hf" else dst.read_bytes() == b"mine"
        assert graft_cli(["convert", str(ddp_pth), str(dst), "--to", to, "--force", "--strip-prefix"]) == 0
        assert "wrote" in capsys.readouterr().out
        assert_bitwise(read_back(dst, to), source_state())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([OUT_NAME["torch"], OUT_NAME["hf"]])


def test_source_failing_validation_leaves_nothing(hf_sharded, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_sharded.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    last = sorted(broken.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-10])  # a cut-short download
    for to in TARGETS:
        dst = tmp_path / OUT_NAME[to]
        with pytest.raises(CheckpointError, match="truncated"):
            convert(broken, dst, to)
        assert not dst.exists()
    assert graft_cli(["convert", str(broken), str(tmp_path / "x.pth"), "--to", "torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_ring_wraps_waits_and_stops():
    """The arena's allocator: first in first out, wraps to the start, waits when full, stops."""
    import threading

    from graft.conversion.stream import _Ring

    ring = _Ring(100)
    assert ring.alloc(40) == 0 and ring.alloc(40) == 40
    ring.free()  # [0, 40) back
    assert ring.alloc(30) == 0  # no 30 bytes after 80: wraps
    assert ring.alloc(10) == 30  # between the wrapped region and the oldest one
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.alloc(15)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # full: it waits for space, it does not allocate more
    ring.free()  # [40, 80) back
    waiter.join(5)
    assert got == [40]
    blocked = threading.Thread(target=lambda: got.append(ring.alloc(90)))
    blocked.start()
    ring.stop()
    blocked.join(5)
    assert got == [40, None]


def test_cli_rules_cast_and_json(ddp_pth, tmp_path, capsys):
    dst = tmp_path / "cli.pth"
    argv = ["convert", "--strip-prefix", "--rename", r"\.layers\.=.blocks.", "--exclude", "mask", "--dtype", "fp16",
            str(ddp_pth), str(dst), "--to", "torch", "--json"]
    assert graft_cli(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dropped"] == {"module.mask": "excluded by 'mask'"}
    assert data["casts"] == {"float32 -> float16": 4, "bfloat16 -> float16": 1}
    assert data["keys"]["blocks.1.weight"] == {"source_key": "module.layers.1.weight", "shape": [16, 16],
                                              "dtype": "float16", "source_dtype": "bfloat16", "file": "."}
    want = {k.replace("layers.", "blocks."): v for k, v in source_state().items() if k != "mask"}
    assert_bitwise(torch.load(dst, weights_only=True), want, dtype=torch.float16)
