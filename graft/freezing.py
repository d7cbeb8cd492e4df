"""Freeze, unfreeze, and hand the optimizer exactly the parameters that still train."""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch

from graft.loading.plan import without_wrappers


def _select(model: torch.nn.Module, names_or_patterns: Iterable[str]) -> list[tuple[str, torch.nn.Parameter]]:
    wanted = list(names_or_patterns)
    if isinstance(names_or_patterns, str):
        raise TypeError("pass a list of names or glob patterns, e.g. ['features.*']")
    exact = set(wanted)
    chosen = []
    for name, p in model.named_parameters():
        canon = without_wrappers(name)  # so patterns work on wrapped models
        if name in exact or canon in exact or any(
            fnmatch.fnmatchcase(name, w) or fnmatch.fnmatchcase(canon, w) for w in wanted
        ):
            chosen.append((name, p))
    return chosen


def freeze(model: torch.nn.Module, names_or_patterns: Iterable[str]) -> list[str]:
    """Set requires_grad=False on the named parameters (exact names or globs); returns them."""
    chosen = _select(model, names_or_patterns)
    for _, p in chosen:
        p.requires_grad_(False)
    return [n for n, _ in chosen]


def unfreeze(model: torch.nn.Module, names_or_patterns: Iterable[str] | None = None) -> list[str]:
    """Set requires_grad=True on the named parameters, or on all of them when None."""
    chosen = list(model.named_parameters()) if names_or_patterns is None else _select(model, names_or_patterns)
    for _, p in chosen:
        p.requires_grad_(True)
    return [n for n, _ in chosen]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Exactly what an optimizer should get: parameters with requires_grad, each once."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def frozen_parameter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def param_groups(
    model: torch.nn.Module,
    weight_decay: float = 0.0,
    no_decay: Iterable[str] = ("*.bias", "*norm*", "*bn*"),
) -> list[dict]:
    """Trainable parameters in two optimizer groups: with and without weight decay.

    Biases and normalisation weights usually take no decay; frozen parameters are left out.
    """
    patterns = list(no_decay)
    decay, plain = [], []
    for name, p in trainable_named_parameters(model):
        canon = without_wrappers(name)  # so patterns work on wrapped models
        (plain if p.ndim <= 1 or any(fnmatch.fnmatchcase(canon, w) for w in patterns) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups
