"""The StateAdapter for one process, DDP and FSDP2: a torch module and a torch optimizer.

    adapter = TorchAdapter(unwrapped_model, torch_optimizer, kind="ddp")
    save(run_dir, name, adapter, ...)        # or restore(folder, adapter)

The three strategies differ only in what their tensors are, and `module_state.tensor_holding`
reads that from each tensor: a plain tensor is replicated on every rank (single, DDP, FSDP2's
buffers), an FSDP2 DTensor is held as its local rows (parameters and their optimizer state).
So one class serves all three; `kind` is recorded in the manifest (and shown by `graft
inspect`). Pass the UNWRAPPED module (no `module.` prefix): its state_dict names are the
logical names.
"""

from __future__ import annotations

from typing import Mapping

import torch

from graft.checkpointing import layout
from graft.checkpointing.module_state import model_holdings
from graft.checkpointing.optimizer_state import OptimizerState, parameter_names
from graft.checkpointing.slices import Holding, StateMismatch

KINDS = ("single", "ddp", "fsdp2")


def name_differences(saved: set[str], live: set[str], what: str) -> str | None:
    missing, unexpected = sorted(live - saved), sorted(saved - live)
    if not missing and not unexpected:
        return None
    parts = []
    if missing:
        parts.append(f"this run has {what} the checkpoint lacks: {missing[:5]}")
    if unexpected:
        parts.append(f"the checkpoint has {what} this run lacks: {unexpected[:5]}")
    return "; ".join(parts)


class TorchAdapter:
    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, kind: str):
        assert kind in KINDS, kind
        self.kind = kind
        self.module = module
        self.optim = OptimizerState(optimizer, parameter_names(module)) if optimizer is not None else None

    def holdings(self) -> list[Holding]:
        return model_holdings(self.module) + (self.optim.holdings() if self.optim else [])

    def extra_state(self) -> dict:
        return {"optimizer": self.optim.extra_state()} if self.optim else {}

    def targets(self, available: Mapping[str, tuple]) -> list[Holding]:
        model = model_holdings(self.module)
        why = name_differences({n for n in available if n.startswith(layout.MODEL_PREFIX)}, {h.name for h in model},
                           "weights")
        if not why:
            wrong = [f"{h.name}: {list(h.shape)} {h.dtype} here, {list(available[h.name][0])} "
                     f"{available[h.name][1]} saved" for h in model if (h.shape, h.dtype) != tuple(available[h.name])]
            why = "; ".join(wrong[:3]) or None
        if why:  # checked before the optimizer state is created: nothing has changed yet
            raise StateMismatch(f"does not fit the model: {why}", "resume with the model config the run was saved with")
        optim = self.optim.targets(available) if self.optim else []
        why = name_differences({n for n in available if n.startswith(layout.OPTIM_PREFIX)}, {h.name for h in optim},
                           "optimizer state")
        if why:
            raise StateMismatch(f"does not fit the optimizer: {why}",
                                "resume with the optimizer and freezing the run was saved with")
        return model + optim

    def load_extra_state(self, extra: dict) -> None:
        if self.optim and "optimizer" in extra:
            self.optim.load_extra_state(extra["optimizer"])

    def finish_restore(self) -> None:
        pass
