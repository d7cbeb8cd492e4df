"""Run configs: YAML + overrides in, errors that name the key, resolved YAML out."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from graft.config import RunConfig, diff, field_docs, load_config, parse_override
from graft.errors import ConfigError, GraftError
from launch import REPO


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=7", "optimizer.lr=1e-3", "train.keep_last=null",
                             "init.exclude=[classifier.6.*]", "model.kwargs={num_classes: 3}"])
    assert cfg.train.epochs == 7 and cfg.optimizer.lr == 1e-3 and cfg.train.keep_last is None
    assert cfg.init.exclude == ["classifier.6.*"] and cfg.model.kwargs == {"num_classes": 3}
    assert parse_override("--train.seed=4") == ("train.seed", 4)


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train: {epochs: 3, out_dir: x}\nschedule: {name: step, gamma: 0.1}\n")
    cfg = load_config(p, ["train.epochs=5"])
    assert (cfg.train.epochs, cfg.train.out_dir, cfg.schedule.name, cfg.schedule.gamma) == (5, "x", "step", 0.1)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", r"unknown config key 'train.epoch'; allowed in train: \['epochs'"),
    ("trian.epochs=3", r"unknown config key 'trian'; allowed sections: \['model', 'init'"),
    ("init.on_mismatch=maybe", "init.on_mismatch='maybe'; use skip, error or copy-overlap"),
    ("schedule.on_extend=jump", "schedule.on_extend='jump'"),
    ("train.strategy=fsdp", "train.strategy='fsdp'; use auto or fsdp2"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5"),
    ("init.freeze=loaded", "init.freeze='loaded' needs init.checkpoint"),
    ("precision=fp8", "precision='fp8'"),
    ("train=3", "train must be a mapping"),
    ("epochs", "write it as section.field=value"),
])
def test_mistakes_are_config_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [override])
    assert isinstance(info.value, GraftError) and isinstance(info.value, ValueError)  # train.py: one line


def test_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_config(tmp_path / "nope.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot read the run config"):
        load_config(bad, [])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["train.epochs=[1"])


def test_resolved_yaml_round_trips():
    cfg = load_config(None, ["init.checkpoint=base", "init.freeze=loaded", "init.rename=[['^module\\.', '']]"])
    again = RunConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and diff(cfg.to_dict(), again.to_dict()) == {}
    assert diff(cfg.to_dict(), load_config(None, ["train.epochs=2"]).to_dict())["train.epochs"] == (10, 2)


def test_every_field_has_a_one_line_doc():
    for section in [RunConfig, *(type(getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)
                                 if dataclasses.is_dataclass(getattr(RunConfig(), f.name)))]:
        docs = field_docs(section)
        missing = [f.name for f in dataclasses.fields(section) if not docs.get(f.name)]
        assert not missing, (section.__name__, missing)


@pytest.mark.parametrize("name", ["digits_base.yaml", "digits_graft.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name, [])
    assert cfg.data.name == "digits"
    if name == "digits_graft.yaml":
        assert cfg.init.checkpoint and cfg.init.freeze == "loaded" and "rnn3" in cfg.model.factory
