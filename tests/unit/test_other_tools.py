"""Checkpoints as users have them, each written by the real tool (issue 14).

transformers `save_pretrained`, an HF Trainer output folder, a Lightning `.ckpt`, timm's
CheckpointSaver, a PEFT LoRA adapter and `torch.save(model)`: each opens with no options (or
the one the refusal names), plans into a changed model, loads bitwise what the tool wrote, and
the report's rules line says which alignment fired. Every refusal is a CheckpointError whose
way out is followed here and works. Tiny configs: each tool writes in about a second.
"""

from __future__ import annotations

import argparse
import ast
import re
import warnings
from pathlib import Path

import lightning as L  # the writers: test-only dependencies (pyproject's dev extra)
import peft
import pytest
import timm
import torch
import transformers
from torch import nn

import graft
from graft.errors import CheckpointError


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().flatten().view(torch.uint8), b.detach().flatten().view(torch.uint8))


def assert_loaded_bitwise(model: nn.Module, report, expected: dict[str, torch.Tensor]) -> None:
    """Every loaded model key holds exactly the writer's tensor named by `expected[key]`."""
    state = model.state_dict()
    assert report.loaded and set(report.loaded) <= set(expected)
    for key in report.loaded:
        assert bitwise(state[key], expected[key]), key


def tiny_bert_config(**kw):
    return transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32, **kw)


class Net(nn.Module):
    """What a Lightning module or a whole-module pickle holds: BatchNorm buffers, a head, and a
    non-persistent buffer that a state dict leaves out."""

    def __init__(self, classes: int = 4, extra: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, classes)
        if extra:
            self.adapter = nn.Linear(16, 16)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x):
        return self.fc2(self.bn(self.fc1(x)).relu())


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    net(torch.randn(8, 8))  # moves the BatchNorm running stats off their defaults
    return net


# -- the writers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertModel(tiny_bert_config())
    out = tmp_path_factory.mktemp("hf") / "bert-base"
    model.save_pretrained(out)
    return out, model.state_dict()


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([1, 2, 3, 4 + i]), "labels": torch.tensor(i % 2)}


@pytest.fixture(scope="module")
def hf_trainer(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=2))
    out = tmp_path_factory.mktemp("trainer") / "output"
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=3, save_steps=1, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens()).train()
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


class LitNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lightning")
    data = torch.utils.data.TensorDataset(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    lit = LitNet()
    trainer = L.Trainer(max_steps=2, default_root_dir=out, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=8))
    (ckpt,) = (out / "checkpoints").glob("*.ckpt")  # ModelCheckpoint's default: epoch=0-step=2.ckpt
    return ckpt, lit.state_dict()


@pytest.fixture(scope="module")
def timm_ckpt(tmp_path_factory):
    from timm.utils import CheckpointSaver

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5, pretrained=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = tmp_path_factory.mktemp("timm")
    # timm's train.py hands the saver its argparse namespace, which lands in the file as `args`.
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model="resnet10t"), checkpoint_dir=str(out),
                            recovery_dir=str(out), max_history=2)
    saver.save_checkpoint(0, metric=0.5)
    return out, model.state_dict()


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.BertModel(tiny_bert_config()),
                                peft.LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():  # LoRA's B starts at zero: give it values a wrong copy would show
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(out)
    return out, peft.get_peft_model_state_dict(model)


# -- the six tools -----------------------------------------------------------------------
def test_save_pretrained_base_model_into_a_task_model(hf_base):
    folder, written = hf_base
    ckpt = graft.open(folder)
    assert ckpt.format == "transformers" and ckpt.source == "model.safetensors"
    model = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=3))  # task model around it
    report = graft.load(model, folder, verbose=False)
    assert report.format == "transformers"
    assert report.renames == [f"stripped leading name 'bert.' from {len(written)} model keys"
                              f" ({len(written)} keys match with it, 0 without)"]
    assert sorted(report.new) == ["classifier.bias", "classifier.weight"] and not report.unexpected
    assert_loaded_bitwise(model, report, {f"bert.{k}": v for k, v in written.items()})


def test_gpt2_base_into_its_lm_head_model_loads_the_tied_head(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    base = transformers.GPT2Model(config)
    base.save_pretrained(tmp_path)
    model = transformers.GPT2LMHeadModel(config)
    report = graft.load(model, tmp_path, verbose=False)
    assert any("leading name 'transformer.'" in r and "model keys" in r for r in report.renames)
    assert not report.new and not report.unexpected  # lm_head is tied to the loaded wte
    assert bitwise(model.lm_head.weight, base.wte.weight)
    assert_loaded_bitwise(model, report, {**{f"transformer.{k}": v for k, v in base.state_dict().items()},
                                          "lm_head.weight": base.wte.weight})


def test_trainer_output_folder_opens_its_newest_checkpoint(hf_trainer):
    out, final = hf_trainer
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    ckpt = graft.open(out)
    assert ckpt.format == "hf-trainer" and ckpt.source == "checkpoint-3/model.safetensors"
    assert ckpt.info()["step"] == 3
    assert graft.open(out / "checkpoint-2").info()["step"] == 2
    model = transformers.BertModel(tiny_bert_config())  # the fine-tuned encoder, without its head
    report = graft.load(model, out, verbose=False)
    assert report.renames == [f"stripped leading name 'bert.' from {len(report.loaded)} checkpoint keys"
                              f" ({len(report.loaded)} keys match with it, 0 without)"]
    assert sorted(report.unexpected) == ["classifier.bias", "classifier.weight"] and not report.new
    assert_loaded_bitwise(model, report, {k.removeprefix("bert."): v for k, v in final.items()})
    assert "hf-trainer, weights at 'checkpoint-3/model.safetensors'" in str(report)


def test_an_interrupted_trainer_save_is_skipped(hf_trainer, tmp_path):
    import shutil

    out = tmp_path / "output"
    shutil.copytree(hf_trainer[0], out)
    (out / "checkpoint-3" / "trainer_state.json").unlink()  # the Trainer writes it last
    with pytest.warns(UserWarning, match="skipped incomplete checkpoint-3"):
        ckpt = graft.open(out)
    assert ckpt.source == "checkpoint-2/model.safetensors" and ckpt.info()["skipped_incomplete"] == ["checkpoint-3"]


def test_lightning_ckpt_into_the_bare_network_with_a_new_head(lightning_ckpt):
    path, written = lightning_ckpt
    model = Net(classes=6, extra=True)
    report = graft.load(model, path, verbose=False)
    assert report.format == "torch" and report.source == "state_dict"
    assert report.renames == ["stripped leading name 'net.' from 9 checkpoint keys (9 keys match with it, 0 without)"]
    assert sorted(report.mismatched) == ["fc2.bias", "fc2.weight"]
    assert sorted(report.new) == ["adapter.bias", "adapter.weight"]
    assert_loaded_bitwise(model, report, {k.removeprefix("net."): v for k, v in written.items()})


def test_timm_training_checkpoint_into_a_resized_head(timm_ckpt):
    folder, written = timm_ckpt
    for name in ("last.pth.tar", "model_best.pth.tar", "checkpoint-0.pth.tar"):
        assert graft.open(folder / name).source == "state_dict"  # argparse `args` rebuilt inert
    model = timm.create_model("resnet10t", num_classes=7, pretrained=False)
    report = graft.load(model, folder / "model_best.pth.tar", verbose=False)
    assert report.renames == [] and sorted(report.mismatched) == ["fc.bias", "fc.weight"]
    assert_loaded_bitwise(model, report, written)


def test_lora_adapter_loads_into_a_peft_model_with_more_targets(lora_adapter):
    folder, written = lora_adapter
    ckpt = graft.open(folder)
    assert ckpt.format == "peft" and ckpt.info()["r"] == 2 and ckpt.info()["peft_type"] == "LORA"
    torch.manual_seed(1)
    model = peft.get_peft_model(transformers.BertModel(tiny_bert_config()),
                                peft.LoraConfig(r=2, target_modules=["query", "key", "value"]))
    report = graft.load(model, folder, verbose=False)
    assert report.renames == [f"inserted PEFT adapter name 'default' into {len(written)} checkpoint keys"]
    assert len(report.loaded) == len(written) and not report.unexpected
    assert {k for k in report.new if "lora" in k} == {k for k in model.state_dict() if ".key.lora_" in k}
    assert_loaded_bitwise(model, report, {k.replace(".weight", ".default.weight"): v for k, v in written.items()})


def test_lora_adapter_finds_a_named_adapter(lora_adapter):
    folder, written = lora_adapter
    model = peft.get_peft_model(transformers.BertModel(tiny_bert_config()),
                                peft.LoraConfig(r=2, target_modules=["query", "value"]), adapter_name="mine")
    report = graft.load(model, folder, verbose=False)
    assert report.renames == [f"inserted PEFT adapter name 'mine' into {len(written)} checkpoint keys"]
    assert_loaded_bitwise(model, report, {k.replace(".weight", ".mine.weight"): v for k, v in written.items()})


def test_two_adapters_that_fit_equally_are_named_by_following_the_suggestion(lora_adapter):
    folder, written = lora_adapter
    config = dict(r=2, target_modules=["query", "value"])
    model = peft.get_peft_model(transformers.BertModel(tiny_bert_config()), peft.LoraConfig(**config))
    model.add_adapter("other", peft.LoraConfig(**config))
    plan = graft.plan(model, graft.open(folder))
    assert plan.loaded == [] and plan.rules == []
    (hint,) = plan.suggestions
    assert "several PEFT adapter names" in hint and "(default, other)" in hint
    option = re.search(r"pass (\w+)= the one", hint).group(1)
    report = graft.load(model, folder, **{option: "other"}, verbose=False)  # the suggestion, followed
    assert report.renames == [f"inserted PEFT adapter name 'other' into {len(written)} checkpoint keys"]
    assert_loaded_bitwise(model, report, {k.replace(".weight", ".other.weight"): v for k, v in written.items()})


def test_safetensors_format_on_an_adapter_folder_names_the_ways_that_work(lora_adapter):
    folder, written = lora_adapter
    with pytest.raises(CheckpointError) as err:
        graft.open(folder, format="safetensors")
    assert "is a folder" in err.value.problem
    assert "leave format=None (the folder opens as 'peft')" in err.value.way_out
    file = re.search(r"point at the file: (\S+)", err.value.way_out).group(1)
    assert graft.open(file, format="safetensors").keys() == list(written)  # the second way, followed
    assert graft.open(folder).format == "peft"  # the first


def test_torch_save_of_a_whole_module_loads_by_following_the_refusal(tmp_path):
    net = trained_net()
    for obj, source in ((net, "pickled module test_other_tools.Net"),
                        ({"epoch": 3, "model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict()},
                         "model (pickled module test_other_tools.Net)")):
        path = tmp_path / "whole.pt"
        torch.save(obj, path)
        with pytest.raises(CheckpointError) as err:
            graft.open(path)
        assert "whole pickled module" in err.value.problem and "no code from the file runs" in err.value.way_out
        allow = ast.literal_eval(re.search(r"allow_globals=(\[.*?\])", err.value.way_out).group(1))
        model = Net(classes=6)
        report = graft.load(model, path, allow_globals=allow, verbose=False)  # the way out, followed
        assert report.source == source
        assert "scratch" not in report.used  # non-persistent: no part of the state dict
        assert sorted(report.mismatched) == sorted(report.unexpected) == ["fc2.bias", "fc2.weight"]
        assert_loaded_bitwise(model, report, net.state_dict())


# -- refusals that say what the file is ------------------------------------------------------
@pytest.mark.parametrize("name, what", [("optimizer.pt", "an optimizer state"),
                                        ("scheduler.pt", "an LR scheduler state"),
                                        ("rng_state.pth", "random number generator states"),
                                        ("training_args.bin", "TrainingArguments")])
def test_trainer_files_that_are_not_weights_say_what_they_are(hf_trainer, name, what):
    folder = hf_trainer[0] / "checkpoint-3"
    with pytest.raises(CheckpointError) as err:
        graft.open(folder / name)
    assert what in err.value.problem and "not model weights" in err.value.problem
    followed = re.search(r"graft\.open\('(.*?)'\)", err.value.way_out).group(1)
    assert Path(followed) == folder and graft.open(followed).format == "hf-trainer"


def test_an_optimizer_file_alone_points_at_the_weights_beside_it(tmp_path):
    from safetensors.torch import save_file

    net = trained_net()
    torch.save(torch.optim.AdamW(net.parameters()).state_dict(), tmp_path / "optimizer.pt")
    save_file(net.state_dict(), tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match="optimizer state") as err:
        graft.open(tmp_path / "optimizer.pt")
    followed = re.search(r"beside it: (\S+)", err.value.way_out).group(1)
    assert graft.load(Net(), followed, verbose=False).coverage == 1.0


# -- prefixes: used when unambiguous, suggested otherwise --------------------------------------
class Distill(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher = trained_net(0)
        self.student = trained_net(1)


def test_two_leading_names_that_fit_equally_are_suggested_not_guessed(tmp_path):
    path = tmp_path / "distill.pt"
    distill = Distill()
    torch.save(distill.state_dict(), path)
    plan = graft.plan(Net(), graft.open(path))
    assert plan.loaded == [] and plan.rules == []
    assert len(plan.suggestions) == 2 and all(s.startswith("ambiguous:") for s in plan.suggestions)
    assert "suggestion  ambiguous: rename=[(r'^teacher\\.', '')]" in str(graft.load(Net(), path, verbose=False))
    rule = next(s for s in plan.suggestions if "student" in s)
    rename = ast.literal_eval(re.search(r"rename=(\[.*?\])", rule).group(1))
    model = Net()
    report = graft.load(model, path, rename=rename, verbose=False)  # the suggestion, followed
    assert report.coverage == 1.0
    assert_loaded_bitwise(model, report, {k.removeprefix("student."): v for k, v in distill.state_dict().items()})


def test_a_leading_name_that_adds_few_keys_is_only_suggested(tmp_path):
    path = tmp_path / "sd.pt"
    net = trained_net()
    state = net.state_dict()
    torch.save({**{k: v for k, v in state.items() if not k.startswith("fc2.")},
                "head.fc2.weight": state["fc2.weight"], "head.fc2.bias": state["fc2.bias"]}, path)
    plan = graft.plan(Net(), graft.open(path))
    assert plan.rules == [] and len(plan.loaded) == 7
    assert plan.suggestions == ["rename=[(r'^head\\.', '')] would match 2 more keys ('head.' stripped from the checkpoint)"]


# -- the printed report ----------------------------------------------------------------------
def test_a_mismatched_key_is_printed_once_and_kept_whole_in_json(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(trained_net().state_dict(), path)
    report = graft.load(Net(classes=6), path, verbose=False)
    text = str(report)
    assert text.count("fc2.weight") == 1 and text.count("fc2.bias") == 1
    assert "unexpected     0  (and the 2 checkpoint key(s) of the mismatched keys above)" in text
    data = report.to_dict()
    assert sorted(data["unexpected"]) == ["fc2.bias", "fc2.weight"] and sorted(data["mismatched"]) == sorted(data["unexpected"])
    assert "fc2.weight" in data["unexpected_reasons"]
    dry = str(graft.plan(Net(classes=6), graft.open(path)))
    assert dry.count("fc2.weight") == 1
