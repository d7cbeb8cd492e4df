"""How a run is distributed: one class per strategy; the loop never branches on which.

    Single     one process (accelerate.prepare, no wrapper)
    DDP        accelerate launch, several processes (DistributedDataParallel)
    FSDP2      parameters sharded with torch's `fully_shard`: by us when train.strategy=fsdp2
               (torchrun, any device), or by accelerate's FSDP2 plugin when `accelerate launch
               --use_fsdp --fsdp_version 2` runs on GPUs. Either way the model is an FSDPModule.
    DeepSpeed  accelerate launch with a DeepSpeed config (ZeRO 1/2/3)

Each strategy wraps the model (`shard`, `prepare`). Checkpoints need nothing from it:
`graft.Checkpointer` reads what the wrapped model is (a DeepSpeed engine, an FSDP2 module,
DDP...) and picks its adapter itself, as it does in a user's own loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from graft._logging import get_logger
from graft.errors import ConfigError

log = get_logger(__name__)


class Strategy:
    kind: str = ""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes

    # -- wrapping --------------------------------------------------------------------
    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap before the optimizer exists (FSDP2's fully_shard); the others wrap in `prepare`."""
        return model

    def prepare(self, model, optimizer, batch_size: int):
        return self.acc.prepare(model, optimizer)

    # -- collectives -----------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


class Single(Strategy):
    kind = "single"


class DDP(Strategy):
    kind = "ddp"


class FSDP2(Strategy):
    kind = "fsdp2"

    def __init__(self, accelerator, ours: bool):
        super().__init__(accelerator)
        self.ours = ours
        """True: train.strategy=fsdp2, we call fully_shard; False: accelerate's plugin does in prepare()."""

    def shard(self, model):
        if not self.ours:
            return model
        from torch.distributed.device_mesh import init_device_mesh

        from graft.wrapping import wrap_fsdp2

        return wrap_fsdp2(model, init_device_mesh(self.acc.device.type, (self.world,)))

    def prepare(self, model, optimizer, batch_size: int):
        if self.ours:
            return model, optimizer  # accelerate would add DDP on top
        return super().prepare(model, optimizer, batch_size)


class DeepSpeed(Strategy):
    kind = "deepspeed"

    def prepare(self, model, optimizer, batch_size: int):
        plugin = self.acc.state.deepspeed_plugin
        # No dataloader goes through prepare (we shard the data ourselves), so DeepSpeed's
        # "auto" micro batch size must be filled here.
        if plugin.is_auto("train_micro_batch_size_per_gpu"):
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        return self.acc.prepare(model, optimizer)



def make_strategy(accelerator, requested: str) -> Strategy:
    """The strategy of this launch: `requested` is train.strategy ("auto" or "fsdp2")."""
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    if requested == "fsdp2":
        if dt == DistributedType.DEEPSPEED:
            raise ConfigError("train.strategy=fsdp2 under a DeepSpeed launch: pick one (train.strategy=auto "
                              "for DeepSpeed, or launch without --use_deepspeed)")
        return FSDP2(accelerator, ours=True)
    if dt == DistributedType.DEEPSPEED:
        return DeepSpeed(accelerator)
    if dt == DistributedType.FSDP:
        return FSDP2(accelerator, ours=False)
    return DDP(accelerator) if accelerator.num_processes > 1 else Single(accelerator)
