"""Models built on the `meta` device: memory first, values from the stream.

Ranks other than 0 may build their model on `meta` (no memory): it is materialised before
the plan, then filled from the stream. Rank 0's values are what every rank gets for
everything the checkpoint does not fill, so rank 0 must hold real values there.
"""

from __future__ import annotations

import torch

from graft.errors import PlanError
from graft.loading.plan import LoadPlan


def materialize_meta(model: torch.nn.Module) -> list[str]:
    """Give every meta parameter and buffer real (uninitialised) memory; returns their names.

    Not `Module.to_empty`: it makes a new Parameter per registration, which unties tied
    weights. Here one tensor registered under two names stays one tensor. The memory goes
    to the device of the model's other tensors, else the CPU.
    """
    device = next((t.device for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"),
                  torch.device("cpu"))
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old kept alive, new)
    names = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for slot in (module._parameters, module._buffers):
            for name, t in list(slot.items()):
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device=device)
                    if isinstance(t, torch.nn.Parameter):
                        new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                    done[id(t)] = (t, new)
                slot[name] = done[id(t)][1]
                names.append(f"{mod_name}.{name}" if mod_name else name)
    return names


def require_rank0_values(plan: LoadPlan, materialized: list[str]) -> None:
    """On rank 0: every tensor that was on `meta` must be filled by the checkpoint, since
    rank 0's values of the others are what every rank receives."""
    filled = {k for k, e in plan.entries.items() if e.action == "load"}
    empty = [n for n in materialized if n not in filled]
    if empty:
        raise PlanError(
            f"{plan.path}: rank 0's model has {len(empty)} tensor(s) on the meta device that the"
            f" checkpoint does not fill, e.g. {empty[:3]}; rank 0's values are what every rank gets"
            "\n  way out: build the model on a real device on rank 0 (meta is fine on the other ranks)"
        )
