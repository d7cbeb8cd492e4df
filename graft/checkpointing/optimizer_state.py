"""A torch optimizer's state as logical tensors by parameter NAME, and back.

    optim/<fqn>/<state key>    exp_avg, exp_avg_sq, step, momentum_buffer, max_exp_avg_sq, ...

with the parameter's global shape (a DTensor state of an FSDP2 parameter is held as its local
rows, like the parameter; scalar `step` tensors are replicated). param_groups go to JSON with
their hyper-parameters and the NAMES of their parameters; non-tensor state values too.

A torch optimizer has no state before its first step, so a restore first creates it the way
the optimizer itself would: one step with zero gradients and every learning rate set to 0
(what torch.distributed.checkpoint does for the same reason). The state then has the shapes,
dtypes, devices and DTensor placements of a real step, and `targets()` can hand out views of
it; every value is overwritten from the checkpoint (the tests check the result equals
`load_state_dict`). With lr = 0 the parameters do not move (and they are restored next anyway).
"""

from __future__ import annotations

from typing import Mapping

import torch

from graft.checkpointing import codec, layout
from graft.checkpointing.module_state import tensor_holding
from graft.checkpointing.slices import Holding, StateMismatch


def parameter_names(module: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> its name in `module` (the first name of a tied parameter)."""
    return {id(p): fqn for fqn, p in module.named_parameters()}


def init_state(optimizer: torch.optim.Optimizer) -> bool:
    """Create the optimizer's state with one zero-gradient step at lr 0; False if it already had state."""
    if optimizer.state:
        return False
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise RuntimeError("init_state: parameters hold gradients; restore before the first backward")
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
    return True


class OptimizerState:
    """The logical-tensor view of one torch optimizer over a module's parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str]):
        self.optimizer = optimizer
        self.names = names
        self.params: list[tuple[str, torch.nn.Parameter]] = []
        for g in optimizer.param_groups:
            for p in g["params"]:
                assert id(p) in names, "the optimizer holds a parameter that is not in the model"
                self.params.append((names[id(p)], p))

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for fqn, p in self.params:
            for key, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out.append((layout.optim_name(fqn, key), v))
        return out

    def holdings(self) -> list[Holding]:
        return [tensor_holding(name, t) for name, t in self._tensors()]

    def extra_state(self) -> dict:
        groups = [(g, [self.names[id(p)] for p in g["params"]]) for g in self.optimizer.param_groups]
        scalars = {fqn: {k: v for k, v in self.optimizer.state.get(p, {}).items() if not isinstance(v, torch.Tensor)}
                   for fqn, p in self.params}
        return groups_state(groups, scalars)

    def targets(self, available: Mapping[str, tuple]) -> list[Holding]:
        mine = {fqn for fqn, _ in self.params}
        saved = {layout.split_optim_name(n)[0] for n in available if n.startswith(layout.OPTIM_PREFIX)}
        if saved - mine:
            raise StateMismatch(f"holds optimizer state of parameters this run does not train: "
                                f"{sorted(saved - mine)[:5]}",
                                "resume with the freezing and optimizer the run was saved with")
        if saved:
            init_state(self.optimizer)
        return self.holdings()

    def load_extra_state(self, extra: dict) -> None:
        live = [(g, [self.names[id(p)] for p in g["params"]]) for g in self.optimizer.param_groups]
        by_name = dict(self.params)
        for fqn, other in load_groups_state(live, extra).items():
            self.optimizer.state[by_name[fqn]].update(other)


def groups_state(groups: list[tuple[dict, list[str]]], scalars: dict[str, dict]) -> dict:
    """JSON of an optimizer's param groups (hyper-parameters and the NAMES of their parameters)
    and of its non-tensor per-parameter state; shared by every adapter, so any strategy reads it."""
    out = []
    for g, names in groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        out.append({"hyper": codec.encode(hyper, _no_tensors("param_groups")), "params": names})
    return {"param_groups": out,
            "scalars": {fqn: codec.encode(v, _no_tensors(f"state of {fqn}")) for fqn, v in scalars.items() if v}}


def load_groups_state(live: list[tuple[dict, list[str]]], extra: dict) -> dict[str, dict]:
    """Check the saved param groups against the live ones (same count, same parameter names in
    order), put the saved hyper-parameters back; returns the non-tensor state by parameter name."""
    groups = extra.get("param_groups", [])
    if len(groups) != len(live):
        raise StateMismatch(f"has {len(groups)} optimizer param groups, this run {len(live)}",
                            "resume with the optimizer config the run was saved with")
    for i, ((g, names), saved) in enumerate(zip(live, groups)):
        if names != saved["params"]:
            raise StateMismatch(f"optimizer param group {i} holds {saved['params'][:3]}..., "
                                f"this run's {names[:3]}...",
                                "resume with the model, freezing and optimizer the run was saved with")
    for (g, _), saved in zip(live, groups):
        g.update(codec.decode(saved["hyper"], {}))
    return {fqn: codec.decode(other, {}) for fqn, other in extra.get("scalars", {}).items()}


class _no_tensors(dict):
    """An `encode` sink that refuses tensors: hyper-parameters and scalars must be plain JSON."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def __setitem__(self, key, value):
        raise TypeError(f"a tensor in the optimizer's {self.where} ({key}) cannot go to JSON; it is not supported")
