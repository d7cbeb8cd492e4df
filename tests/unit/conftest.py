import pytest
import torch
from checks import Small, trained_small_model  # noqa: F401 - Small: the unit tests import it from here
from torch import nn


class Wrapper(nn.Module):
    """Stands where DDP stands: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.fixture
def trained_small():
    return trained_small_model()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed"
