"""The StateAdapter for DeepSpeed ZeRO 1, 2 and 3: the engine's flat partitions as logical tensors.

DeepSpeed trains fp32 master weights kept in FLAT partitions, and its optimizer (a torch
optimizer over those flat tensors) keeps its state in tensors of the same shape:

- stages 1 and 2: per param group, the trainable parameters laid end to end, cut into N equal
  parts (`single_partition_of_fp32_groups[g]` is this rank's); a parameter may straddle ranks;
- stage 3: per sub-group, each parameter's own partition laid end to end
  (`fp32_partitioned_groups_flat[s]`); a parameter's partition on rank r is elements
  [r * ceil(numel / N), ...) of it, the last ones shorter or empty.

Either way, what a rank holds of a parameter is one flat element range of the logical tensor,
with a view of it in the flat partition, and the SAME range of every optimizer state tensor:
exactly a `Holding`. So a save writes those views (no gather, no DeepSpeed checkpoint), and a
restore at any world size, stage or strategy asks for the ranges that the NEW partitioning
holds, fills them, and lets DeepSpeed refresh its low-precision copies. Neither side needs
DeepSpeed's offline scripts (zero_to_fp32, ds_to_universal).

The logical names and the JSON state are those of `TorchAdapter` (model/<fqn>, optim/<fqn>/<key>,
param groups by parameter names), so ZeRO, DDP, FSDP2 and one process read each other's run
checkpoints. Frozen parameters and buffers are the module's own tensors: whole and replicated at
stages 1 and 2 (and buffers at 3), each rank's partition (`ds_tensor`) for parameters at stage 3.

DeepSpeed internals used (0.19; universal checkpoints rely on the same ones): at stages 1/2
`bit16_groups`, `single_partition_of_fp32_groups`, each parameter's `_hp_mapping` (where its
fragment lies in the parameter and in the partition), `update_lp_params`; at stage 3
`fp16_groups`, `fp32_partitioned_groups_flat`, `fp16_partitioned_groups_flat`,
`sub_group_to_group_id`, `persistent_parameters`, `param.partition_numel()`, `ds_tensor`,
`ds_shape`. Read at construction: a DeepSpeed without them fails there, with its version named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from graft._logging import get_logger
from graft.checkpointing import layout
from graft.checkpointing.module_state import state_tensors
from graft.checkpointing.optimizer_state import groups_state, init_state, load_groups_state, parameter_names
from graft.checkpointing.slices import Holding, StateMismatch, whole
from graft.checkpointing.torch_adapter import name_differences

log = get_logger(__name__)


@dataclass(frozen=True)
class _Fragment:
    """Elements [start, stop) of a trained parameter live at [offset, offset + stop - start) of `flat`."""

    flat: torch.Tensor
    """The optimizer's flat fp32 partition (its key in optimizer.state)."""
    offset: int
    start: int
    stop: int
    shape: tuple[int, ...]
    """The parameter's global shape."""

    def holding(self, name: str, source: torch.Tensor) -> Holding:
        """`source` is `flat` or an optimizer state tensor of the same shape."""
        n = self.stop - self.start
        return Holding(name, self.shape, source.dtype, self.start, self.stop,
                       source.view(-1)[self.offset: self.offset + n], replicated=False)


class ZeroAdapter:
    kind = "deepspeed"

    def __init__(self, engine):
        self.engine = engine
        self.zero = engine.optimizer
        self.inner: torch.optim.Optimizer = self.zero.optimizer
        self.stage = int(engine.zero_optimization_stage())
        self.module: torch.nn.Module = engine.module
        self.names = parameter_names(self.module)
        group = getattr(self.zero, "dp_process_group", None)
        self.rank = dist.get_rank(group=group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(group=group) if dist.is_initialized() else 1
        try:
            self._layout()
        except AttributeError as e:  # pragma: no cover - a DeepSpeed whose internals moved
            import deepspeed

            raise RuntimeError(f"run checkpoints of ZeRO stage {self.stage} read DeepSpeed's partitions, and "
                               f"deepspeed {deepspeed.__version__} lacks {e.name!r}; use deepspeed 0.19") from e
        self._scalars: list[tuple[torch.Tensor, str, str, torch.Tensor]] = []

    # -- where every trained parameter lives ---------------------------------------------------
    def _layout(self) -> None:
        self.fragments: dict[int, _Fragment] = {}  # id(param) -> this rank's fragment (absent: none here)
        self.flat_of: dict[int, torch.Tensor] = {}  # id(param) -> the flat partition its state is in
        order = {id(p): i for i, p in enumerate(self.module.parameters())}
        by_group: dict[int, list] = {}
        if self.stage == 3:
            z = self.zero
            for s, params in enumerate(z.fp16_groups):
                flat, offset = z.fp32_partitioned_groups_flat[s], 0
                by_group.setdefault(z.sub_group_to_group_id[s], []).extend(params)
                for p in params:
                    part = p.partition_numel()
                    start = min(self.rank * part, p.ds_numel)
                    stop = min(start + part, p.ds_numel)
                    self.fragments[id(p)] = _Fragment(flat, offset, start, stop, tuple(p.ds_shape))
                    self.flat_of[id(p)] = flat
                    offset += part
                assert offset == flat.numel(), (s, offset, flat.numel())  # the layout DeepSpeed builds
        else:
            for g, params in enumerate(self.zero.bit16_groups):
                flat = self.zero.single_partition_of_fp32_groups[g]
                by_group[g] = list(params)
                for p in params:
                    self.flat_of[id(p)] = flat
                    m = getattr(p, "_hp_mapping", None)
                    if m is not None:  # None: no element of p is in this rank's partition
                        start = m.lp_fragment_address.start
                        self.fragments[id(p)] = _Fragment(flat, m.hp_fragment_address.start, start,
                                                          start + m.lp_fragment_address.numel, tuple(p.shape))
        # Groups list their parameters in MODULE order, as TorchAdapter's param groups do when
        # built from named_parameters (graft.param_groups): the saved names compare as lists.
        self.groups = [[self.names[id(p)] for p in sorted(by_group.get(g, []), key=lambda p: order[id(p)])]
                       for g in range(len(self.inner.param_groups))]
        self.trained = {id(p): self.names[id(p)] for ps in by_group.values() for p in ps}
        self.flats = list({id(f): f for f in self.flat_of.values()}.values())

    # -- weights ----------------------------------------------------------------------------------
    def _model(self) -> tuple[list[Holding], dict[str, tuple]]:
        """This rank's holdings of every model/<fqn>, and every model tensor's (shape, dtype)."""
        held, entries = [], {}
        for fqn, t in state_tensors(self.module).items():
            name = layout.model_name(fqn)
            f = self.fragments.get(id(t))
            if id(t) in self.trained:
                entries[name] = (self.fragments[id(t)].shape if f else tuple(t.shape), self.flat_of[id(t)].dtype)
                if f is not None:
                    held.append(f.holding(name, f.flat))
            elif hasattr(t, "ds_tensor"):  # stage 3, frozen: this rank's partition of it
                part = t.ds_tensor.detach().reshape(-1)
                start = min(self.rank * part.numel(), t.ds_numel)
                stop = min(start + part.numel(), t.ds_numel)
                entries[name] = (tuple(t.ds_shape), part.dtype)
                held.append(Holding(name, tuple(t.ds_shape), part.dtype, start, stop, part[: stop - start]))
            else:  # buffers, and frozen parameters at stages 1/2: the module's own, on every rank
                h = whole(name, t, replicated=True)
                entries[name] = (h.shape, h.dtype)
                held.append(h)
        return held, entries

    # -- optimizer state ----------------------------------------------------------------------
    def _state(self, p_id: int) -> dict:
        return self.inner.state.get(self.flat_of[p_id], {})

    def _optim(self) -> tuple[list[Holding], list[tuple[str, str, torch.Tensor]]]:
        """Fragments of the flat state tensors, and the scalar states (step...) of every trained parameter."""
        held, scalars = [], []
        for p_id, fqn in self.trained.items():
            flat, f = self.flat_of[p_id], self.fragments.get(p_id)
            for key, v in sorted(self._state(p_id).items()):
                if not isinstance(v, torch.Tensor):
                    continue
                if v.dim() == 0:
                    scalars.append((fqn, key, v))
                elif v.shape == flat.shape:
                    if f is not None:
                        held.append(f.holding(layout.optim_name(fqn, key), v))
                else:
                    raise NotImplementedError(f"optimizer state {key!r} of shape {list(v.shape)} beside a flat "
                                              f"partition of {flat.numel()}: run checkpoints of ZeRO support "
                                              "element-wise optimizer state (Adam, AdamW, SGD...)")
        return held, scalars

    def holdings(self) -> list[Holding]:
        model, _ = self._model()
        optim, scalars = self._optim()
        # Scalar states (the step of a flat partition) are the same on every rank: replicated.
        return model + optim + [whole(layout.optim_name(fqn, key), v, replicated=True) for fqn, key, v in scalars]

    def extra_state(self) -> dict:
        live = list(zip(self.inner.param_groups, self.groups))
        scalars = {}
        for p_id, fqn in self.trained.items():
            other = {k: v for k, v in self._state(p_id).items() if not isinstance(v, torch.Tensor)}
            if other:
                scalars[fqn] = other
        out = {"optimizer": groups_state(live, scalars)}
        scaler = getattr(self.zero, "loss_scaler", None)
        if getattr(self.zero, "dynamic_loss_scale", False) and scaler is not None:
            # fp16: the dynamic loss scale is training state (a resumed run must start from it).
            out["loss_scaler"] = {k: v for k, v in vars(scaler).items() if type(v) in (int, float, bool)}
        return out

    # -- restore ----------------------------------------------------------------------------------
    def targets(self, available: Mapping[str, tuple]) -> list[Holding]:
        model, entries = self._model()
        why = name_differences({n for n in available if n.startswith(layout.MODEL_PREFIX)}, set(entries), "weights")
        if not why:
            wrong = [f"{n}: {list(s)} {d} here, {list(available[n][0])} {available[n][1]} saved"
                     for n, (s, d) in entries.items() if (tuple(s), d) != tuple(available[n])]
            why = "; ".join(wrong[:3]) or None
        if why:  # checked before the optimizer state is created: nothing has changed yet
            raise StateMismatch(f"does not fit the model: {why}", "resume with the model config the run was saved with")
        saved = {layout.split_optim_name(n)[0] for n in available if n.startswith(layout.OPTIM_PREFIX)}
        trained = set(self.trained.values())
        if saved - trained:
            raise StateMismatch(f"holds optimizer state of parameters this run does not train: "
                                f"{sorted(saved - trained)[:5]}",
                                "resume with the freezing and optimizer the run was saved with")
        if saved:
            self._create_state()
        optim, scalars = self._optim()
        expected = {layout.optim_name(fqn, key) for p_id, fqn in self.trained.items()
                    for key, v in self._state(p_id).items() if isinstance(v, torch.Tensor)}
        why = name_differences({n for n in available if n.startswith(layout.OPTIM_PREFIX)}, expected,
                               "optimizer state")
        if why:
            raise StateMismatch(f"does not fit the optimizer: {why}",
                                "resume with the optimizer and freezing the run was saved with")
        # A flat partition has ONE step for all its parameters: each parameter's saved step is read
        # into a scalar of its own, and finish_restore checks they agree before setting it.
        self._scalars = []
        extra = []
        for fqn, key, v in scalars:
            t = torch.empty((), dtype=v.dtype)
            self._scalars.append((v, fqn, key, t))
            extra.append(whole(layout.optim_name(fqn, key), t, replicated=True))
        return model + optim + extra

    def _create_state(self) -> None:
        """Optimizer state with the shapes of a real step, before it is overwritten (see init_state)."""
        if all(self.inner.state.get(f) for f in self.flats):
            return
        if self.stage == 3:  # stage 3 hands the optimizer its flat partitions only during a step
            self.zero._set_fp32_optimizer_param_groups()
        try:
            init_state(self.inner)
        finally:
            if self.stage == 3:
                self.zero._clear_fp32_optimizer_param_groups()

    def load_extra_state(self, extra: dict) -> None:
        if "optimizer" in extra:
            live = list(zip(self.inner.param_groups, self.groups))
            by_name = {fqn: p_id for p_id, fqn in self.trained.items()}
            for fqn, other in load_groups_state(live, extra["optimizer"]).items():
                self.inner.state[self.flat_of[by_name[fqn]]].update(other)
        scaler = getattr(self.zero, "loss_scaler", None)
        if extra.get("loss_scaler") and scaler is not None:
            for k, v in extra["loss_scaler"].items():
                if hasattr(scaler, k):
                    setattr(scaler, k, v)

    def finish_restore(self) -> None:
        by_target: dict[tuple[int, str], list] = {}
        for live, fqn, key, t in self._scalars:
            by_target.setdefault((id(live), key), [live]).append((fqn, t))
        for (_, key), (live, *saved) in by_target.items():
            values = {t.item() for _, t in saved}
            if len(values) > 1:
                log.warning("the checkpoint's %r differs between parameters that share one ZeRO partition (%s); "
                            "the partition takes %s's", key, sorted(values)[:4], saved[0][0])
            live.copy_(saved[0][1])
        self._scalars = []
        z = self.zero
        if self.stage == 3:
            for s, (lp, hp) in enumerate(zip(z.fp16_partitioned_groups_flat, z.fp32_partitioned_groups_flat)):
                if hp.numel():
                    lp.data.copy_(hp.data)
                z._unflatten_partitioned_parameters(s)
            if z.persistent_parameters:  # small parameters every rank keeps whole
                z.persistent_parameters[0].all_gather(z.persistent_parameters)
            if hasattr(z, "invalidate_secondary_tensor"):
                z.invalidate_secondary_tensor()
        else:
            z.update_lp_params()  # this rank's fp32 partition into the bit16 copy, all-gathered
