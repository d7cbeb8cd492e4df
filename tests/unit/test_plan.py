"""Planning: prefixes, renames, include/exclude, shape and dtype policies, buckets."""

import pytest
import torch
from conftest import Small, Wrapper, snapshot
from safetensors.torch import save_file

import graft


def save(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def assert_buckets_partition(report_or_plan, model, ckpt_keys):
    model_keys = set(model.state_dict())
    loaded, new, mism = set(report_or_plan.loaded), set(report_or_plan.new), set(report_or_plan.mismatched)
    assert loaded | new | mism == model_keys
    assert not (loaded & new) and not (loaded & mism) and not (new & mism)
    used, unexpected = set(report_or_plan.used), set(report_or_plan.unexpected)
    assert used | unexpected == set(ckpt_keys) and not (used & unexpected)


def test_same_model_loads_everything_including_buffers(tmp_path, trained_small):
    path = save(tmp_path, trained_small.state_dict())
    m = Small()
    report = graft.load(m, path, verbose=False)
    assert set(report.loaded) == set(m.state_dict())
    assert "bn.running_mean" in report.loaded and "bn.num_batches_tracked" in report.loaded
    assert torch.equal(m.bn.running_mean, trained_small.bn.running_mean)
    assert int(m.bn.num_batches_tracked) == 1
    assert report.coverage == 1.0
    assert report.bytes_read == sum(v.numel() * v.element_size() for v in trained_small.state_dict().values())


@pytest.mark.parametrize("wrap_ckpt,wrap_model", [(True, False), (False, True), (True, True)])
def test_ddp_prefix_on_either_side_is_recognised(tmp_path, trained_small, wrap_ckpt, wrap_model):
    state = (Wrapper(trained_small) if wrap_ckpt else trained_small).state_dict()
    path = save(tmp_path, state)
    m = Wrapper(Small()) if wrap_model else Small()
    report = graft.load(m, path, verbose=False)
    assert len(report.loaded) == len(state) and not report.unexpected
    if wrap_ckpt != wrap_model:
        assert any("'module.'" in r for r in report.renames), report.renames
    else:
        assert report.renames == []
    inner = m.module if wrap_model else m
    assert torch.equal(inner.head.weight, trained_small.head.weight)


def test_compiled_model_prefix(tmp_path, trained_small):
    path = save(tmp_path, trained_small.state_dict())
    compiled = torch.compile(Small())
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    report = graft.load(compiled, path, verbose=False)
    assert len(report.loaded) == len(trained_small.state_dict())
    assert torch.equal(compiled._orig_mod.conv.weight, trained_small.conv.weight)
    # and the other way: a checkpoint saved from a compiled model
    path2 = save(tmp_path, torch.compile(trained_small).state_dict(), "compiled.pth")
    report2 = graft.load(Small(), path2, verbose=False)
    assert len(report2.loaded) == len(trained_small.state_dict())
    assert any("_orig_mod" in r for r in report2.renames)


def test_lightning_style_model_prefix_only_when_it_helps(tmp_path, trained_small):
    state = {f"model.{k}": v for k, v in trained_small.state_dict().items()}
    path = save(tmp_path, {"state_dict": state, "epoch": 3})
    report = graft.load(Small(), path, verbose=False)
    assert report.source == "state_dict"
    assert len(report.loaded) == len(state)
    assert any("'model.'" in r for r in report.renames)


def test_rename_rules_apply_in_order_and_are_reported(tmp_path, trained_small):
    state = {k.replace("conv", "backbone.stem"): v for k, v in trained_small.state_dict().items()}
    path = save(tmp_path, state)
    m = Small()
    report = graft.load(m, path, rename=[(r"^backbone\.", "net."), (r"^net\.stem", "conv")], verbose=False)
    assert {"conv.weight", "conv.bias"} <= set(report.loaded)
    assert len(report.renames) == 2 and "on 2 checkpoint keys" in report.renames[0]
    assert torch.equal(m.conv.weight, trained_small.conv.weight)


def test_include_and_exclude(tmp_path, trained_small):
    path = save(tmp_path, trained_small.state_dict())
    m = Small()
    before = snapshot(m)
    report = graft.load(m, path, exclude=["head.*"], verbose=False)
    assert set(report.new) == {"head.weight", "head.bias"}
    assert "excluded" in report.plan.entries["head.weight"].reason
    assert torch.equal(m.head.weight, before["head.weight"])
    assert set(report.unexpected) == {"head.weight", "head.bias"}
    m2 = Small()
    report2 = graft.load(m2, path, include=["conv.*"], verbose=False)
    assert set(report2.loaded) == {"conv.weight", "conv.bias"}
    assert_buckets_partition(report2, m2, trained_small.state_dict())


def test_shape_mismatch_policies(tmp_path, trained_small):
    path = save(tmp_path, trained_small.state_dict())
    # skip: the head keeps its own values, reported with both shapes
    m = Small(num_classes=12)
    head_before = m.head.weight.detach().clone()
    report = graft.load(m, path, freeze="loaded", verbose=False)
    assert set(report.mismatched) == {"head.weight", "head.bias"}
    assert "(12, 4) in model vs (10, 4) in checkpoint" in report.plan.entries["head.weight"].reason
    assert torch.equal(m.head.weight, head_before)
    assert m.head.weight.requires_grad and not m.conv.weight.requires_grad
    assert_buckets_partition(report, m, trained_small.state_dict())
    # error: nothing changes, and the message names key and shapes
    m = Small(num_classes=12)
    before = snapshot(m)
    with pytest.raises(graft.PlanError, match=r"head.weight.*\(12, 4\) in model vs \(10, 4\)"):
        graft.load(m, path, on_mismatch="error", verbose=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    # copy-overlap: a head grown from 10 to 12 classes keeps the 10 it had
    m = Small(num_classes=12)
    head_before = m.head.weight.detach().clone()
    report = graft.load(m, path, on_mismatch="copy-overlap", freeze="loaded", verbose=False)
    assert set(report.partial) == {"head.weight", "head.bias"}
    assert torch.equal(m.head.weight[:10], trained_small.head.weight)
    assert torch.equal(m.head.weight[10:], head_before[10:])
    assert m.head.weight.requires_grad, "a partly loaded head is not frozen"
    assert set(report.used) == set(trained_small.state_dict())


def test_float_dtypes_cast_and_reported_int_float_never_silent(tmp_path, trained_small):
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in trained_small.state_dict().items()}
    path = save(tmp_path, state)
    m = Small()
    report = graft.load(m, path, verbose=False)
    assert "conv.weight" in report.casts
    assert torch.equal(m.conv.weight, state["conv.weight"].float())
    assert "cast" in str(report)
    # an int tensor where the model has a float: mismatched with the reason, never cast
    bad = dict(trained_small.state_dict())
    bad["head.bias"] = torch.arange(10)
    path = save(tmp_path, bad, "int.pth")
    m = Small()
    report = graft.load(m, path, verbose=False)
    assert "head.bias" in report.mismatched
    assert "never cast" in report.plan.entries["head.bias"].reason
    with pytest.raises(graft.PlanError, match="never cast"):
        graft.load(Small(), path, on_mismatch="error", verbose=False)


def test_two_checkpoint_keys_on_one_model_key_is_an_error(tmp_path, trained_small):
    state = dict(trained_small.state_dict())
    state["module.conv.weight"] = state["conv.weight"].clone()
    path = save(tmp_path, state)
    m = Small()
    before = snapshot(m)
    with pytest.raises(graft.PlanError, match=r"'conv.weight'.*'renamed.conv.weight'|both map"):
        graft.load(m, path, rename=[(r"^module\.", "")], verbose=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_tied_weights_load_through_the_key_that_is_present(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

    src = Tied()
    path = tmp_path / "tied.safetensors"
    save_file({"embed.weight": src.embed.weight.detach().clone()}, path)
    m = Tied()
    report = graft.load(m, path, freeze="loaded", verbose=False)
    assert set(report.loaded) == {"embed.weight", "out.weight"}
    assert report.plan.entries["out.weight"].tied_to == "embed.weight"
    assert torch.equal(m.out.weight, src.embed.weight) and not m.out.weight.requires_grad


def test_plan_is_a_dry_run_and_prints_a_table(tmp_path, trained_small):
    path = save(tmp_path, trained_small.state_dict())
    m = Small(num_classes=3, extra=True)
    before = snapshot(m)
    plan = graft.plan(m, path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    text = str(plan)
    for word in ("loaded", "new", "mismatched", "unexpected", "extra.weight", "head.weight"):
        assert word in text
    d = plan.to_dict()
    assert d["keys"]["extra.weight"]["action"] == "new"
    assert d["keys"]["head.weight"]["checkpoint_shape"] == [10, 4]
    assert_buckets_partition(plan, m, trained_small.state_dict())


def test_report_json_round_trips(tmp_path, trained_small):
    import json

    path = save(tmp_path, {"model": trained_small.state_dict(), "optimizer": {"lr": 0.1}})
    report = graft.load(Small(num_classes=4, extra=True), path, freeze="loaded", verbose=False)
    d = json.loads(report.to_json())
    assert d["source"] == "model"
    assert set(d["loaded"]) == set(report.loaded) and set(d["new"]) == {"extra.weight", "extra.bias"}
    assert d["bytes_read"] == report.bytes_read > 0
    assert set(d["frozen"]) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias"}
    assert 0 < d["coverage"] < 1


def test_single_process_load_into_a_meta_model_is_refused(tmp_path, trained_small):
    path = save(tmp_path, trained_small.state_dict())
    with torch.device("meta"):
        m = Small()
    assert "head.weight" in graft.plan(m, path).loaded  # planning a meta model is fine (graft diff does it)
    with pytest.raises(graft.PlanError, match="meta device"):
        graft.load(m, path, verbose=False)
