import json

import torch

from graft.launch.cli import main
from graft.models import tiny_vgg


def test_inspect_and_diff(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "base.pth"
    torch.save({"model": tiny_vgg(num_classes=10).state_dict()}, path)

    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "torch" and info["container"] == "model"
    assert info["tensors"] == len(tiny_vgg().state_dict()) and info["bytes"] > 0
    assert set(info["groups"]) == {"features", "classifier"} and "float32" in info["dtypes"]

    args = ["diff", str(path), "--model", "graft.models:tiny_vgg_rnn3", "--model-kwargs", '{"num_classes": 4}']
    assert main(args + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["new"]) == {"rnn3.0.weight", "rnn3.0.bias"}
    assert set(plan["mismatched"]) == {"classifier.6.weight", "classifier.6.bias"}
    assert main(args + ["--min-coverage", "0.9999"]) == 1
    out = capsys.readouterr()
    assert "rnn3.0.weight" in out.out and "below --min-coverage" in out.err
    assert main(args + ["--exclude", "features.*", "--min-coverage", "0.5"]) == 1


def test_inspect_a_run_checkpoint_shows_world_size_strategy_and_layout(tmp_path, capsys):
    from graft.checkpointing.save import save
    from graft.checkpointing.torch_adapter import TorchAdapter

    model = tiny_vgg()
    opt = torch.optim.AdamW(model.parameters())
    save(tmp_path, "epoch_000001", TorchAdapter(model, opt, "single"), info={"epoch": 1, "step": 4})
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "world_size   1" in out and "strategy     single" in out
    assert "layout       sharded: 1 shard file(s)" in out and "logical tensors: model 22" in out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"]["shard_files"] == 1 and info["manifest_version"] == 2 and info["tensors"] == 22
