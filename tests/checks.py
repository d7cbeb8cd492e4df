"""The models the tests build, and the assertion the reader tests share (a changed model loads a
real writer's weights). One builder per model; where copies differed on purpose (the seed), it is
a parameter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # graft is imported where used: tests/unit/conftest.py imports this module, and an
    import graft  # import error of graft should fail the tests that use it, not the collection

# The seed of the changed model the reader tests load writers' checkpoints into; any other seed
# than the writers' gives the new and resized parts other values than the checkpoint's.
CHANGED_SEED = 123


def changed_model(seed: int = CHANGED_SEED, num_classes: int = 7, **kwargs) -> torch.nn.Module:
    """The writers' tiny_vgg(num_classes=5) with a new rnn3 block and a resized head (7 classes),
    seeded by `seed` (the broadcast tests seed each rank differently: bcast_common.changed_model)."""
    from graft.models import tiny_vgg_rnn3

    torch.manual_seed(seed)
    return tiny_vgg_rnn3(num_classes=num_classes, **kwargs)


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


def trained_small_model() -> Small:
    """A seeded Small after one forward pass in train mode (BatchNorm's running stats moved off
    their defaults); tests/unit's `trained_small` fixture."""
    torch.manual_seed(0)
    m = Small()
    m.train()
    m(torch.randn(8, 3, 6, 6))  # moves BatchNorm running stats off their defaults
    return m


def assert_changed_model_loads(folder, final: dict[str, torch.Tensor], **open_options) -> graft.LoadReport:
    """Everything but the resized head loads bit for bit, frozen; rnn3 and the head train;
    only the planned tensors are read."""
    import graft

    model = changed_model()
    report = graft.load(model, folder, freeze="loaded", verbose=False, **open_options)
    state = model.state_dict()
    assert sorted(report.loaded) == sorted(k for k in final if not k.startswith("classifier.6."))
    for key in report.loaded:
        assert torch.equal(state[key], final[key]), key
    assert sorted(report.new) == ["rnn3.0.bias", "rnn3.0.weight"]
    assert sorted(report.mismatched) == ["classifier.6.bias", "classifier.6.weight"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(report.new + report.mismatched)
    assert report.bytes_read == report.plan.bytes_to_read == sum(final[k].nbytes for k in report.loaded)
    return report
