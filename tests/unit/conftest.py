import pytest
import torch
from torch import nn


class Small(nn.Module):
    """Conv + BatchNorm (buffers) + a head: enough shapes to exercise every rule."""

    def __init__(self, num_classes: int = 10, extra: bool = False):
        super().__init__()
        if extra:
            self.extra = nn.Linear(4, 4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        x = self.bn(self.conv(x)).mean((2, 3))
        if hasattr(self, "extra"):
            x = self.extra(x)
        return self.head(x)


class Wrapper(nn.Module):
    """Stands where DDP stands: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.fixture
def trained_small():
    torch.manual_seed(0)
    m = Small()
    m.train()
    m(torch.randn(8, 3, 6, 6))  # moves BatchNorm running stats off their defaults
    return m


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed"
