"""How the model is wrapped, and how its full and optimizer state come out and go back in.

One class for every way a run is distributed; the loop never branches on the strategy:

    single     one process (accelerate.prepare, no wrapper)
    ddp        accelerate launch, several processes (DistributedDataParallel)
    deepspeed  accelerate launch with a DeepSpeed config (ZeRO 1/2/3)
    fsdp2      parameters sharded with torch's `fully_shard`: by us when
               train.strategy=fsdp2 (torchrun, any device), or by accelerate's FSDP2 plugin
               when `accelerate launch --use_fsdp --fsdp_version 2` runs on GPUs. Either way the
               model is an FSDPModule afterwards and the same state-dict code serves it.

What a checkpoint holds, per strategy, and why:

- model weights: always GATHERED to one full `model.safetensors` (rank 0 writes it). The
  run checkpoint is then a plain set of named tensors that `graft.open` / `graft.load`
  read like any other file, whatever the world size that wrote it; for the models this
  trainer targets the gather costs one copy of the weights on rank 0.
- optimizer state: GATHERED (full, keyed by parameter name) for single, ddp and fsdp2, via
  `torch.distributed.checkpoint.state_dict` (FSDP2 shards are gathered to CPU on rank 0),
  so those runs can resume with another number of processes. SHARDED (one file per rank)
  under DeepSpeed: ZeRO keeps the optimizer state as flat fp32 partitions whose layout
  (padding, bucket boundaries) belongs to the engine; DeepSpeed's own state_dict per rank
  is stored without pickle and loaded back through the engine, which needs the same
  world size and ZeRO stage on resume (checked).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from graft._logging import get_logger
from graft.errors import ConfigError

log = get_logger(__name__)


def _dcp():
    from torch.distributed.checkpoint import state_dict as sd

    return sd


def is_fsdp2(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())


class Strategy:
    def __init__(self, accelerator, requested: str):
        from accelerate.utils import DistributedType

        self.acc = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.requested = requested
        dt = accelerator.distributed_type
        if requested == "fsdp2":
            self.kind = "fsdp2"
            if dt == DistributedType.DEEPSPEED:
                raise ConfigError("train.strategy=fsdp2 under a DeepSpeed launch: pick one (train.strategy=auto "
                                 "for DeepSpeed, or launch without --use_deepspeed)")
        elif dt == DistributedType.DEEPSPEED:
            self.kind = "deepspeed"
        elif dt == DistributedType.FSDP:
            self.kind = "fsdp2"  # accelerate's plugin wraps in prepare()
        else:
            self.kind = "ddp" if self.world > 1 else "single"
        self.optimizer_layout = "sharded" if self.kind == "deepspeed" else "full"

    # -- wrapping --------------------------------------------------------------------
    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """train.strategy=fsdp2: `fully_shard` each top-level block, then the root (before the optimizer)."""
        if self.requested != "fsdp2":
            return model
        from torch.distributed.device_mesh import init_device_mesh

        from graft.wrapping import wrap_fsdp2

        return wrap_fsdp2(model, init_device_mesh(self.acc.device.type, (self.world,)))

    def prepare(self, model, optimizer, batch_size: int):
        if self.requested == "fsdp2":
            return model, optimizer  # sharded by us; accelerate would add DDP on top
        if self.kind == "deepspeed":
            plugin = self.acc.state.deepspeed_plugin
            # No dataloader goes through prepare (we shard the data ourselves), so
            # DeepSpeed's "auto" micro batch size must be filled here.
            if plugin.is_auto("train_micro_batch_size_per_gpu"):
                plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        return self.acc.prepare(model, optimizer)

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def _torch_optimizer(self, optimizer):
        return getattr(optimizer, "optimizer", optimizer)

    @property
    def zero_stage(self) -> int:
        return self.acc.state.deepspeed_plugin.zero_stage if self.kind == "deepspeed" else 0

    # -- state out -------------------------------------------------------------------
    def model_state(self, model) -> dict[str, torch.Tensor]:
        """Full weights with the model's own names; complete on rank 0 (collective for ZeRO-3 / FSDP2)."""
        if self.kind == "deepspeed":
            if self.zero_stage == 3:
                return model._zero3_consolidated_16bit_state_dict() or {}
            return self.unwrap(model).state_dict()
        if self.kind == "fsdp2":
            sd = _dcp()
            return sd.get_model_state_dict(model, options=sd.StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.unwrap(model).state_dict()

    def optimizer_state(self, model, optimizer) -> dict:
        """Full (on rank 0, names as keys) or this rank's shard (DeepSpeed), per `optimizer_layout`."""
        if self.kind == "deepspeed":
            return self._torch_optimizer(optimizer).state_dict()
        sd = _dcp()
        opts = sd.StateDictOptions(full_state_dict=True, cpu_offload=True) if self.kind == "fsdp2" else None
        return sd.get_optimizer_state_dict(model, self._torch_optimizer(optimizer), options=opts)

    # -- state in --------------------------------------------------------------------
    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        if self.kind == "deepspeed":
            shards = [None] * self.world
            shards[self.rank] = state
            kwargs = {"load_from_fp32_weights": True} if self.zero_stage in (1, 2) else {}
            self._torch_optimizer(optimizer).load_state_dict(shards, **kwargs)
            return
        sd = _dcp()
        opts = sd.StateDictOptions(full_state_dict=True) if self.kind == "fsdp2" else None
        torch_opt = self._torch_optimizer(optimizer)
        tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in torch_opt.param_groups]
        sd.set_optimizer_state_dict(model, torch_opt, state, options=opts)
        # The FSDP path hands hyperparameters back as lists (betas); put the optimizer's own
        # types back so the state (and its checkpoint) is the same as a run that never stopped.
        for group, keys in zip(torch_opt.param_groups, tuples):
            for k in keys:
                if isinstance(group.get(k), list):
                    group[k] = tuple(group[k])

    # -- collectives -----------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
