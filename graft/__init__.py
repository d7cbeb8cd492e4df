"""torch-graft: fit a checkpoint in any common format to a changed model.

    report = graft.load(model, "vgg16_epoch500.pth", freeze="loaded")
    optimizer = torch.optim.AdamW(graft.trainable_parameters(model))

    ckpt = graft.Checkpointer("runs/exp", model=model, optimizer=optimizer, sampler=sampler)
    start = ckpt.resume("auto")          # your own loop: sharded, atomic saves; exact resume
"""

from graft.checkpointing.checkpointer import Checkpointer, ResumePoint, Start, lr_lambda_for_extension
from graft.conversion import convert
from graft.errors import CheckpointError, ConfigError, GraftError, PlanError, RunDirError, RunDirLocked, StorageError
from graft.freezing import (
    freeze,
    frozen_parameter_names,
    param_groups,
    trainable_named_parameters,
    trainable_parameters,
    unfreeze,
)
from graft.loading.api import load, open, plan
from graft.loading.formats import Checkpoint, TensorMeta
from graft.loading.plan import LoadPlan
from graft.loading.report import LoadReport
from graft.sampler import EpochSampler
from graft.wrapping import deepspeed_params, wrap_ddp, wrap_fsdp2

__version__ = "0.1.0"

__all__ = [
    "open",
    "plan",
    "load",
    "convert",
    "freeze",
    "unfreeze",
    "trainable_parameters",
    "trainable_named_parameters",
    "frozen_parameter_names",
    "param_groups",
    "Checkpointer",
    "ResumePoint",
    "Start",
    "EpochSampler",
    "lr_lambda_for_extension",
    "Checkpoint",
    "TensorMeta",
    "LoadPlan",
    "LoadReport",
    "GraftError",
    "CheckpointError",
    "PlanError",
    "ConfigError",
    "RunDirError",
    "RunDirLocked",
    "StorageError",
    "deepspeed_params",
    "wrap_ddp",
    "wrap_fsdp2",
]
