"""The model the conversion and S3 benchmarks move: `layers` x Linear(hidden, hidden) in fp32,
with values fixed by the layer index (so every writer and every check agrees on them)."""

from __future__ import annotations


def layout(gb: float, min_layers: int = 2) -> tuple[int, int]:
    """(hidden, layers) of Linear(hidden, hidden) layers summing to about `gb` GiB of fp32."""
    hidden = 4096 if gb >= 1 else 2048
    layers = max(min_layers, round(gb * 2**30 / (4 * hidden * (hidden + 1))))
    return hidden, layers


def make_state(hidden: int, layers: int) -> dict:
    import torch

    sd = {}
    for i in range(layers):
        g = torch.Generator().manual_seed(i)
        sd[f"layers.{i}.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[f"layers.{i}.bias"] = torch.randn(hidden, generator=g)
    return sd


def probe(t) -> list[float]:
    """The first four values: what each run checks its output against."""
    return [float(x) for x in t.reshape(-1)[:4]]
