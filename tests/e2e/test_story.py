"""The user's story on the real VGG16 shape: train 1000 classes, add rnn3, resize to 102, graft.

Here rather than in tests/unit for its size: two 138M-parameter models per test, seconds each."""

import pytest
import torch
import torchvision

import graft
from graft.models import vgg16, vgg16_rnn3


@pytest.fixture(scope="module")
def vgg16_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = vgg16(num_classes=1000)
    path = tmp_path_factory.mktemp("ckpt") / "vgg16_epoch500.pth"
    torch.save(net.state_dict(), path)
    return path, {k: v.clone() for k, v in net.state_dict().items()}


def test_graft_then_train_changes_only_the_new_parts(vgg16_checkpoint):
    path, saved = vgg16_checkpoint
    torch.manual_seed(1)
    net = vgg16_rnn3(num_classes=102)
    # A model on which plain load_state_dict fails, even with strict=False (size mismatch).
    with pytest.raises(RuntimeError, match="size mismatch"):
        net.load_state_dict(torch.load(path, weights_only=True), strict=False)

    report = graft.load(net, path, freeze="loaded")

    assert set(report.new) == {"rnn3.0.weight", "rnn3.0.bias"}
    assert set(report.mismatched) == {"classifier.6.weight", "classifier.6.bias"}
    assert len(report.loaded) == 30
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"rnn3.0.weight", "rnn3.0.bias", "classifier.6.weight", "classifier.6.bias"}
    assert report.coverage > 0.99

    rnn3_before = net.rnn3[0].weight.detach().clone()
    optimizer = torch.optim.AdamW(graft.trainable_parameters(net), lr=1e-3)
    net.train()
    for step in range(3):
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        y = torch.tensor([3, 7])
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    state = net.state_dict()
    for key in report.loaded:
        assert torch.equal(state[key], saved[key]), key
    assert not torch.equal(net.rnn3[0].weight, rnn3_before)
    with_state = {id(p) for p in optimizer.state}
    assert with_state == {id(p) for p in graft.trainable_parameters(net)}
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[i] for i in with_state} == trainable


def test_torchvision_vgg16_state_dict_loads_into_the_changed_model(tmp_path):
    torch.manual_seed(2)
    tv = torchvision.models.vgg16(weights=None)
    path = tmp_path / "tv_vgg16.pth"
    torch.save(tv.state_dict(), path)
    net = vgg16_rnn3(num_classes=102)
    report = graft.load(net, path, freeze="loaded", verbose=False)
    assert len(report.loaded) == 30 and len(report.new) == 2 and len(report.mismatched) == 2
    tv_state = tv.state_dict()
    for key in report.loaded:
        assert torch.equal(net.state_dict()[key], tv_state[key]), key
    assert sorted(report.unexpected) == ["classifier.6.bias", "classifier.6.weight"]
