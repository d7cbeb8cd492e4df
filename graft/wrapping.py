"""What each wrapper needs from a grafted model. Order: load, freeze, then wrap.

    report = graft.load(model, path, freeze="loaded")   # on every rank, before wrapping
    model = graft.wrap_ddp(model)                        # or wrap_fsdp2, or DeepSpeed:
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(
        graft.deepspeed_params(model)), config=...)
    # accelerate: build the Accelerator first (it starts the process group), then
    # graft.load, then accelerator.prepare(model, torch.optim.AdamW(graft.trainable_parameters(model)))

Why freezing first is enough for each wrapper:
- DDP registers gradient hooks only for parameters with requires_grad; frozen ones are
  never waited for, so `find_unused_parameters` stays False (it costs a graph traversal
  every step). It is needed only if a *trainable* parameter is unused in forward.
- FSDP2 (`fully_shard`) keeps each parameter's requires_grad and supports frozen and
  trainable parameters in one communication group; gradients are reduced for trainable
  ones only. The optimizer must be built after wrapping (the parameters become DTensors).
- DeepSpeed ZeRO builds fp32 master copies and optimizer moments for what its optimizer
  holds: give it trainable parameters only, or frozen weights cost 12-16 bytes each.

Nothing here imports accelerate or deepspeed.
"""

from __future__ import annotations

from typing import Iterable

import torch

from graft.freezing import frozen_parameter_names, trainable_parameters


def _require_trainable(model: torch.nn.Module, who: str) -> list[torch.nn.Parameter]:
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            f"{who}: the model has no trainable parameter ({len(frozen_parameter_names(model))} frozen)"
            "\n  way out: freeze less (e.g. freeze=None or a narrower list), or skip training"
        )
    return params


def deepspeed_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters to give `deepspeed.initialize` (model_parameters=, or your optimizer):
    trainable ones only, each once, so ZeRO's partitions and optimizer state skip frozen ones."""
    return _require_trainable(model, "deepspeed_params")


def wrap_ddp(model: torch.nn.Module, device_ids: list[int] | None = None, **kwargs):
    """`DistributedDataParallel` for a model frozen before wrapping.

    `find_unused_parameters` defaults to False: frozen parameters are not in DDP's
    reducer at all. Pass True only if a trainable parameter can miss the forward pass.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("wrap_ddp needs an initialised process group (torchrun, accelerate launch, ...)")
    _require_trainable(model, "wrap_ddp")
    kwargs.setdefault("find_unused_parameters", False)
    return DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def wrap_fsdp2(
    model: torch.nn.Module,
    mesh=None,
    *,
    modules: Iterable[str] | None = None,
    reshard_after_forward: bool = True,
    **kwargs,
) -> torch.nn.Module:
    """Shard `model` with FSDP2's `fully_shard`: each named submodule (default: every direct
    child that holds parameters), then the root. Frozen and trainable parameters may share
    a unit. Build the optimizer afterwards, over `graft.trainable_parameters(model)`.

    mesh: a 1-D DeviceMesh; by default one over all ranks, on CUDA under nccl, else CPU.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("wrap_fsdp2 needs an initialised process group (torchrun, accelerate launch, ...)")
    _require_trainable(model, "wrap_fsdp2")
    if mesh is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    if modules is None:
        targets = [m for _, m in model.named_children() if any(True for _ in m.parameters())]
    else:
        targets = [model.get_submodule(name) for name in modules]
    for m in targets:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    return model
