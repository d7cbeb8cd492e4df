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
        groups = []
        for g in self.optimizer.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            groups.append({"hyper": codec.encode(hyper, _no_tensors("param_groups")),
                           "params": [self.names[id(p)] for p in g["params"]]})
        scalars = {}
        for fqn, p in self.params:
            other = {k: v for k, v in self.optimizer.state.get(p, {}).items() if not isinstance(v, torch.Tensor)}
            if other:
                scalars[fqn] = codec.encode(other, _no_tensors(f"state of {fqn}"))
        return {"param_groups": groups, "scalars": scalars}

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
        groups = extra.get("param_groups", [])
        live = self.optimizer.param_groups
        if len(groups) != len(live):
            raise StateMismatch(f"has {len(groups)} optimizer param groups, this run {len(live)}",
                                "resume with the optimizer config the run was saved with")
        for i, (g, saved) in enumerate(zip(live, groups)):
            names = [self.names[id(p)] for p in g["params"]]
            if names != saved["params"]:
                raise StateMismatch(f"optimizer param group {i} holds {saved['params'][:3]}..., "
                                    f"this run's {names[:3]}...",
                                    "resume with the model, freezing and optimizer the run was saved with")
            g.update(codec.decode(saved["hyper"], {}))
        by_name = dict(self.params)
        for fqn, other in extra.get("scalars", {}).items():
            self.optimizer.state[by_name[fqn]].update(codec.decode(other, {}))


class _no_tensors(dict):
    """An `encode` sink that refuses tensors: hyper-parameters and scalars must be plain JSON."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def __setitem__(self, key, value):
        raise TypeError(f"a tensor in the optimizer's {self.where} ({key}) cannot go to JSON; it is not supported")
