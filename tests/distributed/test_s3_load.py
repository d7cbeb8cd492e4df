"""Loading from s3:// object storage: every format graft reads, from a real S3-compatible server
(moto on 127.0.0.1, behind a proxy that counts the bytes it sends and can cut a response).

Checkpoints are written by the real tools (DeepSpeed ZeRO-3, FSDP2 + dcp.save, accelerate
save_state, safetensors, huggingface_hub, torch.save, graft's own run checkpoints), uploaded
as they are, and opened again through s3://: every tensor must be bitwise the local read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from launch import REPO, child_env, torchrun
from s3_server import s3, s3_server  # noqa: F401 - the fixtures
from safetensors.torch import save_file

import graft
from graft.checkpointing.save import save as save_run
from graft.checkpointing.torch_adapter import TorchAdapter
from graft.storage import upload_tree

SCRIPTS = REPO / "tests/distributed/scripts"
MB = 1 << 20


class Layers(torch.nn.Module):
    """Eight 1024x1024 fp32 layers (4 MiB each): big against the metadata, so byte counts say
    whether only the planned ranges travelled."""

    def __init__(self, n: int = 8, width: int = 1024):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(n))


def _local_sources(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Layers(4, 256).state_dict().items()}
    state["counter"] = torch.arange(7)
    out = {}
    out["safetensors"] = root / "one.safetensors"
    save_file(state, out["safetensors"])
    (root / "hub").mkdir()
    save_torch_state_dict(state, root / "hub", max_shard_size="300KB")
    out["hf-index"] = root / "hub"
    out["torch"] = root / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, out["torch"])
    run = root / "run"
    save_run(run, "epoch_000001", TorchAdapter(Layers(4, 256), None, "single"), info={"epoch": 1, "step": 1})
    out["graft"] = run
    return out


def _upload(s3, local: Path, name: str) -> str:
    url = s3.url(name)
    if local.is_dir():
        upload_tree(local, url)
    else:
        s3.put(name, local.read_bytes())
    return url


def _assert_same_reads(local: Path | str, url: str) -> int:
    """Open both; same format, keys and every tensor bit for bit. Returns the tensors compared."""
    with graft.open(local) as a, graft.open(url) as b:
        assert (a.format, sorted(a.keys())) == (b.format, sorted(b.keys()))
        assert str(b.path).startswith("s3://")
        for key in a.keys():
            x, y = a.tensor(key), b.tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)), key
        return len(a.keys())


@pytest.mark.parametrize("name", ["zero3", "fsdp2_dcp", "accelerate"])
def test_real_tool_checkpoints_read_from_s3_as_from_disk(real_sources, s3, name):
    src, truth, _ = real_sources[name]
    url = _upload(s3, src, name)
    assert _assert_same_reads(src, url) >= len(truth)


def test_every_local_format_reads_from_s3_as_from_disk(s3, tmp_path):
    for fmt, path in _local_sources(tmp_path).items():
        url = _upload(s3, path, f"{fmt}/{path.name}")
        assert _assert_same_reads(path, url), fmt
        with graft.open(url) as ckpt:
            assert ckpt.format == fmt


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_filtered_load_fetches_only_the_planned_bytes(s3, tmp_path, kind):
    torch.manual_seed(1)
    source = Layers()
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    url = _upload(s3, path, path.name)
    s3.proxy.reset()
    model = Layers()
    report = graft.load(model, url, include=["layers.2.*", "layers.5.*"], verbose=False, progress=False)
    planned = report.plan.bytes_to_read
    assert planned == 2 * 4 * MB and sorted(report.plan.loaded) == ["layers.2.weight", "layers.5.weight"]
    # Everything the server sent (metadata, headers of HTTP itself, the tensors) within 5% of the plan.
    assert s3.proxy.bytes_down <= 1.05 * planned, (s3.proxy.bytes_down, planned, s3.proxy.requests)
    for i in (2, 5):
        assert torch.equal(model.layers[i].weight, source.layers[i].weight)
    assert not torch.equal(model.layers[0].weight, source.layers[0].weight)


def test_a_connection_dropped_mid_read_is_retried_and_the_values_are_right(s3, tmp_path):
    torch.manual_seed(2)
    source = Layers()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), path)
    url = _upload(s3, path, path.name)
    with graft.open(url) as ckpt:  # metadata first, then cut the next big response
        s3.proxy.drop_after(3 * MB)
        model = Layers()
        graft.load(model, ckpt, verbose=False, progress=False)
    assert s3.proxy.drops == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_missing_object_leaves_the_model_untouched(s3):
    model = Layers(2, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graft.CheckpointError, match="s3://"):
        graft.load(model, s3.url("nothing/here.safetensors"), verbose=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_ranks_load_from_s3_with_credentials_on_rank_0_only(s3, tmp_path):
    torch.manual_seed(3)
    source = Layers(4, 256)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), path)
    url = _upload(s3, path, path.name)
    env = child_env(**{k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    torchrun(SCRIPTS / "s3_rank0_load.py", url, path, env=env, timeout=300)


def test_inspect_diff_and_convert_take_s3_urls(s3, tmp_path, capsys):
    from graft.launch.cli import main as graft_cli

    torch.manual_seed(4)
    state = Layers(2, 128).state_dict()
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    url = _upload(s3, path, "cli/w.safetensors")
    assert graft_cli(["inspect", url, "--json"]) == 0
    assert '"layers.1.weight"' in capsys.readouterr().out
    out = tmp_path / "w.pth"
    assert graft_cli(["convert", url, str(out), "--to", "torch"]) == 0
    assert all(torch.equal(v, torch.load(out, weights_only=True)[k]) for k, v in state.items())
