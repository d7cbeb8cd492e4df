"""The example models: VGG (torchvision's layout and key names) with an optional `rnn3` block.

`rnn3` is the block a user adds in front of `features` after training: a 3->3 conv that
keeps the image shape, so the pretrained `features` still see 3 channels.
"""

from __future__ import annotations

import torch
from torch import nn

CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_features(cfg: list, width: float = 1.0, batch_norm: bool = False, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out = max(1, int(v * width))
        layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        c = out
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision's VGG (same module names, so its state dicts load by name), plus `rnn3`."""

    def __init__(
        self,
        cfg: str | list = "vgg16",
        num_classes: int = 1000,
        *,
        width: float = 1.0,
        hidden: int = 4096,
        pool: int = 7,
        rnn3: bool = False,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ):
        super().__init__()
        cfg_list = CFG[cfg] if isinstance(cfg, str) else cfg
        if rnn3:
            self.rnn3 = nn.Sequential(nn.Conv2d(3, 3, kernel_size=3, stride=1, padding=1), nn.Tanh())
        self.features = make_features(cfg_list, width, batch_norm)
        last = max(1, int([v for v in cfg_list if v != "M"][-1] * width))
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(last * pool * pool, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rnn3"):
            x = self.rnn3(x)
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def vgg16(num_classes: int = 1000, rnn3: bool = False, **kwargs) -> VGG:
    """The real VGG16 shape (138M parameters at 1000 classes)."""
    return VGG("vgg16", num_classes, rnn3=rnn3, **kwargs)


def vgg16_rnn3(num_classes: int = 102, **kwargs) -> VGG:
    """The changed model of the story: rnn3 added in front, a 102-class head."""
    return VGG("vgg16", num_classes, rnn3=True, **kwargs)


def tiny_vgg(num_classes: int = 10, rnn3: bool = False, **kwargs) -> VGG:
    """A VGG small enough to train on a CPU in seconds (8x8 or larger images)."""
    kwargs.setdefault("width", 1 / 16)
    kwargs.setdefault("hidden", 64)
    kwargs.setdefault("pool", 1)
    kwargs.setdefault("dropout", 0.0)
    return VGG("vgg11", num_classes, rnn3=rnn3, **kwargs)


def tiny_vgg_rnn3(num_classes: int = 10, **kwargs) -> VGG:
    return tiny_vgg(num_classes, rnn3=True, **kwargs)
