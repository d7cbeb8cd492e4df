"""Assertions shared by the reader tests: a changed model loads a real writer's weights."""

from __future__ import annotations

import torch

import graft
from graft.models import tiny_vgg_rnn3


def changed_model(**kwargs) -> torch.nn.Module:
    """The writers' tiny_vgg(num_classes=5) with a new rnn3 block and a 7-class head."""
    torch.manual_seed(123)
    return tiny_vgg_rnn3(num_classes=7, **kwargs)


def assert_changed_model_loads(folder, final: dict[str, torch.Tensor], **open_options) -> graft.LoadReport:
    """Everything but the resized head loads bit for bit, frozen; rnn3 and the head train;
    only the planned tensors are read."""
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
