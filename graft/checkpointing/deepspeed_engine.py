"""INTERIM DeepSpeed adapter: same world size and ZeRO stage only, until the ZeRO adapter lands.

The ZeRO adapter of issue 10 (`graft/checkpointing/zero.py`, the other half of that issue) maps
DeepSpeed's flat fp32 partitions to logical tensors, so a ZeRO run resumes at any world size and
under any strategy. Until it replaces this module (in `graft.trainer.strategy.DeepSpeed.adapter`),
this one keeps ZeRO runs resumable as before, in the sharded format:

- the module's weights are logical tensors `model/<fqn>`, held without a gather: whole and
  replicated at stages 1 and 2, at stage 3 each rank's own partition (`param.ds_tensor`, a flat
  range of the parameter);
- the engine optimizer's own state_dict of this rank (flat fp32 partitions, moments, loss
  scaler) is rank-private: its tensors `rank/<r>/engine/...` in the rank's shard, the rest in
  the rank's entry of state.json, loaded back through the engine (which needs the same world
  size and stage: `load_extra_state` checks).
"""

from __future__ import annotations

from typing import Mapping

import torch

from graft.checkpointing import codec, layout
from graft.checkpointing.module_state import state_tensors
from graft.checkpointing.slices import Holding, StateMismatch, whole

ENGINE = "engine"


class DeepSpeedEngineState:
    kind = "deepspeed"

    def __init__(self, engine, zero_stage: int, rank: int, world: int):
        self.engine = engine
        self.optimizer = engine.optimizer
        self.stage, self.rank, self.world = zero_stage, rank, world
        self._received: dict[str, torch.Tensor] = {}
        self._meta = None

    # -- model weights ---------------------------------------------------------------------
    def _model(self) -> list[Holding]:
        module = self.engine.module
        if self.stage < 3:
            return [whole(layout.model_name(fqn), t, replicated=True) for fqn, t in state_tensors(module).items()]
        out = []
        params = {id(p): p for p in module.parameters()}
        for fqn, t in module.state_dict(keep_vars=True).items():
            p = params.get(id(t))
            if p is None or not hasattr(p, "ds_tensor"):
                out.append(whole(layout.model_name(fqn), t, replicated=True))
                continue
            part = p.ds_tensor.detach().reshape(-1)
            start = min(self.rank * part.numel(), p.ds_numel)
            stop = min(start + part.numel(), p.ds_numel)
            out.append(Holding(layout.model_name(fqn), tuple(p.ds_shape), part.dtype, start, stop,
                               part[: stop - start], replicated=False))
        return out

    # -- engine-private optimizer state ---------------------------------------------------------
    def _prefix(self) -> str:
        return layout.rank_name(self.rank, ENGINE + "/")

    def _encoded(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        meta = codec.encode(self.optimizer.state_dict(), tensors)
        return meta, tensors

    def holdings(self) -> list[Holding]:
        self._meta, tensors = self._encoded()
        return self._model() + [whole(self._prefix() + k, t, replicated=False) for k, t in tensors.items()]

    def extra_state(self) -> dict:
        return {"zero_stage": self.stage, "world_size": self.world}

    def rank_state(self) -> dict:
        """This rank's engine state, minus its tensors (saved in this rank's entry of state.json)."""
        if self._meta is None:
            self._meta = self._encoded()[0]
        return {"engine": self._meta}

    def targets(self, available: Mapping[str, tuple]) -> list[Holding]:
        model = self._model()
        names = {n for n in available if n.startswith(layout.MODEL_PREFIX)}
        if names != {h.name for h in model}:
            raise StateMismatch(f"does not fit the model (weights differ: {sorted(names ^ {h.name for h in model})[:5]})",
                                "resume with the model config the run was saved with")
        prefix = self._prefix()
        self._received = {}
        out = []
        for name, (shape, dtype) in available.items():
            if name.startswith(prefix):
                t = torch.empty(shape, dtype=dtype)
                self._received[name[len(prefix):]] = t
                out.append(whole(name, t, replicated=False))
        return model + out

    def load_extra_state(self, extra: dict) -> None:
        if extra.get("zero_stage") != self.stage or extra.get("world_size") != self.world:
            raise StateMismatch(f"holds DeepSpeed ZeRO-{extra.get('zero_stage')} state of {extra.get('world_size')} "
                                f"processes; this run is ZeRO-{self.stage} on {self.world}",
                                "resume with the same DeepSpeed config and number of processes")

    def load_rank_state(self, state: dict) -> None:
        self._meta = state["engine"]

    def finish_restore(self) -> None:
        shards = [None] * self.world
        shards[self.rank] = codec.decode(self._meta, self._received)
        kwargs = {"load_from_fp32_weights": True} if self.stage in (1, 2) else {}
        self.optimizer.load_state_dict(shards, **kwargs)
        self._received = {}
