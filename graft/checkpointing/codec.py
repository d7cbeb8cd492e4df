"""Non-tensor state as JSON, without pickle: tuples, enums, dtypes and DeepSpeed's small state
objects survive a round trip; tensors found inside are moved out under their path.

    tensors = {}
    meta = encode(optimizer_like_tree, tensors)   # JSON-able; `tensors` holds what was removed
    tree = decode(meta, tensors)                  # the same tree back

Only classes of the listed packages are rebuilt (by setting their attributes; no code of the
checkpoint runs), and only those are accepted on save.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Any

import torch

from graft.errors import CheckpointError
from graft.loading.formats.base import dtype_name

# Classes `decode` may rebuild from JSON. DeepSpeed keeps a loss scaler object and small
# dataclasses in its optimizer state.
_REBUILDABLE_PREFIXES = ("deepspeed.",)


def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`obj` as JSON; its tensors moved into `tensors` under their path, replaced by references."""
    if isinstance(obj, torch.Tensor):
        key = path or "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, enum.Enum):
        return {"__enum__": f"{type(obj).__module__}:{type(obj).__qualname__}", "value": obj.value}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v, tensors, f"{path}/{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{path}/k{i}"), encode(v, tensors, f"{path}/{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": dtype_name(obj)}
    cls = type(obj)
    qual = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__.startswith(_REBUILDABLE_PREFIXES):
        fields = ({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj)
                  else vars(obj))
        return {"__object__": qual, "state": encode(fields, tensors, f"{path}/state")}
    raise TypeError(f"cannot store {qual} at {path!r} without pickle; add a conversion in graft.checkpointing.codec")


def _import(qual: str):
    module, _, name = qual.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__enum__" in obj:
        return _import(obj["__enum__"])(obj["value"])
    if "__object__" in obj:
        qual = obj["__object__"]
        if not qual.startswith(_REBUILDABLE_PREFIXES):
            raise CheckpointError(qual, "this class may not be rebuilt from a checkpoint",
                                  "only DeepSpeed state objects are rebuilt")
        cls = _import(qual)
        inst = cls.__new__(cls)
        inst.__dict__.update(decode(obj["state"], tensors))
        return inst
    return {k: decode(v, tensors) for k, v in obj.items()}


