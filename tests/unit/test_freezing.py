import torch
from conftest import Small, Wrapper

import graft


def test_freeze_unfreeze_and_trainable_parameters():
    m = Small(extra=True)
    assert graft.freeze(m, ["conv.*", "bn.weight"]) == ["conv.weight", "conv.bias", "bn.weight"]
    assert graft.frozen_parameter_names(m) == ["conv.weight", "conv.bias", "bn.weight"]
    trainable = graft.trainable_parameters(m)
    assert {id(p) for p in trainable} == {id(p) for n, p in m.named_parameters() if n not in
                                          {"conv.weight", "conv.bias", "bn.weight"}}
    graft.unfreeze(m, ["conv.bias"])
    assert m.conv.bias.requires_grad and not m.conv.weight.requires_grad
    graft.unfreeze(m)
    assert all(p.requires_grad for p in m.parameters())


def test_patterns_match_through_wrapper_prefixes():
    w = Wrapper(Small())
    assert graft.freeze(w, ["head.*"]) == ["module.head.weight", "module.head.bias"]


def test_param_groups_hold_only_trainable_parameters():
    m = Small(extra=True)
    graft.freeze(m, ["conv.*"])
    groups = graft.param_groups(m, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in graft.trainable_parameters(m))
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(m.head.weight) in decayed and id(m.head.bias) not in decayed
    torch.optim.AdamW(groups)
