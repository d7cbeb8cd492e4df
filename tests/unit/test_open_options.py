"""graft.open's options: a typo is an error naming the valid ones, an option the opened format
does not use is a warning; input that once reached an assert gets a proper error."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

import graft
from graft.config import ScheduleConfig
from graft.errors import ConfigError
from graft.loading.formats import OpenOptions
from graft.loading.formats.base import OPEN_OPTIONS
from graft.trainer.schedule import Schedule


@pytest.fixture
def files(tmp_path):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(sd, tmp_path / "m.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "m.pt")
    return tmp_path


def test_unknown_option_is_rejected_with_the_valid_ones(files):
    with pytest.raises(TypeError) as e:
        graft.open(files / "m.pt", contianer="state_dict")
    message = str(e.value)
    assert "'contianer'" in message and "did you mean 'container'" in message
    assert all(name in message for name in OPEN_OPTIONS)
    # The same check behind load and plan, which pass their open options through.
    with pytest.raises(TypeError, match="'verfy'"):
        graft.plan(torch.nn.Linear(3, 2), files / "m.pt", verfy="sizes")


def test_every_open_option_is_a_named_field():
    assert set(OPEN_OPTIONS) == {"container", "allow_globals", "trust_pickle", "tag", "model_index",
                                 "verify", "adapter_name"}
    assert not hasattr(OpenOptions(), "extra")


@pytest.mark.parametrize("name, given, option", [
    ("m.safetensors", {"container": "state_dict"}, "container"),
    ("m.pt", {"tag": "global_step1"}, "tag"),
    ("m.pt", {"model_index": 1}, "model_index"),
    ("m.safetensors", {"verify": "sizes"}, "verify"),
])
def test_option_that_does_not_apply_warns(files, name, given, option):
    with pytest.warns(UserWarning, match=rf"{option}=.* ignored: it does not apply to a"):
        graft.open(files / name, **given).close()


def test_options_that_apply_or_keep_their_default_are_silent(files):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graft.open(files / "m.pt", container="state_dict", allow_globals=[]).close()
        graft.open(files / "m.safetensors", tag=None, model_index=0, verify="sha256").close()


def test_a_folder_reader_counts_the_options_of_the_reader_it_opens(files):
    (files / "config.json").write_text("{}")
    (files / "m.safetensors").rename(files / "model.safetensors")
    (files / "m.pt").unlink()
    with graft.open(files) as ckpt:
        assert ckpt.format == "transformers"
        assert ckpt.options_used() == ckpt.inner.options_used() == frozenset()
    with pytest.warns(UserWarning, match="trust_pickle=True ignored"):
        graft.open(files, trust_pickle=True).close()


def test_unknown_schedule_name_is_a_config_error_not_an_assert():
    cfg = ScheduleConfig(name="cosine")
    cfg.name = "cosin"  # a config changed after its own check
    with pytest.raises(ConfigError, match=r"schedule.name='cosin'; use one of"):
        Schedule(cfg, [1.0], steps_per_epoch=10, total_steps=50)
    good = Schedule(ScheduleConfig(name="linear"), [1.0], steps_per_epoch=10, total_steps=50)
    good.cfg.name = "exp"
    with pytest.raises(ConfigError, match="schedule.name='exp'"):
        good.factor(3)

