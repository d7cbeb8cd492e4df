"""What a torch pickle holds when it is not a plain state dict, found without running its code.

Three things users hand graft as "the checkpoint" that are not a state dict:
- a whole module (`torch.save(model)`), alone or inside a training dict. Its classes are
  globals weights_only=True refuses; rebuilt as inert stand-ins (`torch_zip.stand_in`: the
  pickled state is kept as data, no code from the file runs), each module's `_parameters`
  and `_buffers` are plain dicts of tensors, and `_modules` names its children: the state
  dict, with the module's own key names, is read off them.
- files that hold no model at all: optimizer, LR-scheduler and RNG states, the HF Trainer's
  TrainingArguments. They are named as what they are, with the weights file beside them.
- pickles that need a few harmless globals beside a real state dict (timm's argparse
  `args`): `allow_globals` takes glob patterns, and the refusal lists every global at once.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from graft.errors import CheckpointError
from graft.loading.formats.registry import detect
from graft.loading.formats.torch_zip import blocked_global

# Plain attribute bags that training scripts pickle beside the weights (timm's train.py saves
# its argparse `args`): rebuilt as inert stand-ins without being asked.
INERT_BY_DEFAULT = ("argparse.Namespace", "types.SimpleNamespace")
# Each stand-in costs one more pass over the pickle (not over the tensor data); real models
# name a few dozen classes.
_MAX_GLOBALS = 512


def _blocked(e: CheckpointError) -> str | None:
    return blocked_global(str(e.__cause__)) if e.__cause__ is not None else None


def load_with_stand_ins(load: Callable[[list[str]], object], allow: tuple[str, ...]) -> tuple[object, list[str]]:
    """`load(names)` with each refused global that matches a pattern of `allow` stood in.

    Returns the object and the globals stood in; the refusal of a global that no pattern
    allows propagates.
    """
    names = [n for n in (*INERT_BY_DEFAULT, *allow) if not any(c in n for c in "*?[")]
    for _ in range(_MAX_GLOBALS):
        try:
            return load(names), names
        except CheckpointError as e:
            name = _blocked(e)
            if name is None or name in names or not any(fnmatch.fnmatchcase(name, p) for p in allow):
                raise
            names.append(name)
    raise CheckpointError("<pickle>", f"names more than {_MAX_GLOBALS} globals", "save the state dict instead")


def global_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _module_state(obj) -> dict | None:
    """The pickled `__dict__` of a module rebuilt as a stand-in (or a real module's), else None."""
    state = obj.__dict__.get("_state") if hasattr(obj, "__dict__") else None
    if isinstance(obj, torch.nn.Module):
        state = obj.__dict__
    if isinstance(state, Mapping) and isinstance(state.get("_parameters"), Mapping) \
            and isinstance(state.get("_modules"), Mapping):
        return state
    return None


def is_module(obj) -> bool:
    return _module_state(obj) is not None


def module_tensors(obj, prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a pickled module, read off its `_parameters`, `_buffers` and `_modules`
    (non-persistent buffers left out, as `Module.state_dict` leaves them)."""
    state = _module_state(obj)
    if state is None or depth > 256:
        return {}
    out = {}
    for name, t in state["_parameters"].items():
        if isinstance(t, torch.Tensor):
            out[f"{prefix}{name}"] = t
    skip = state.get("_non_persistent_buffers_set") or ()
    for name, t in (state.get("_buffers") or {}).items():
        if isinstance(t, torch.Tensor) and name not in skip:
            out[f"{prefix}{name}"] = t
    for name, child in state["_modules"].items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}.", depth + 1))
    return out


def allow_patterns(names: list[str]) -> list[str]:
    """A short allow_globals list covering `names`: 'package.*' for a package with several."""
    by_top: dict[str, list[str]] = defaultdict(list)
    for n in names:
        by_top[n.split(".")[0]].append(n)
    out = []
    for top, group in by_top.items():
        out += [f"{top}.*"] if len(group) > 2 else group
    return sorted(out)


# -- files that hold no model ------------------------------------------------------------
_RNG_KEYS = {"python", "numpy", "cpu", "cuda", "mps", "xpu", "npu", "hpu", "mlu", "musa", "random_state",
             "numpy_random_seed", "torch_manual_seed", "torch_cuda_manual_seed", "step", "rng_state"}


def what_it_is(obj) -> str | None:
    """What a non-model file holds, when it is one training tools commonly write; else None."""
    if "TrainingArguments" in global_name(obj) or "TrainingArguments" in type(obj).__name__:
        return "the HF Trainer's TrainingArguments (training_args.bin), not model weights"
    if not isinstance(obj, Mapping):
        return None
    keys = {str(k) for k in obj}
    if {"state", "param_groups"} <= keys:
        return ("an optimizer state (optimizer.state_dict(): per-parameter moments keyed by index),"
                " not model weights")
    if {"base_lrs", "last_epoch"} <= keys:
        return "an LR scheduler state (scheduler.state_dict()), not model weights"
    if keys and keys <= _RNG_KEYS and keys & {"python", "numpy", "random_state", "cpu"}:
        return "random number generator states (Python, numpy, torch), not model weights"
    return None


def weights_beside(path: Path) -> str:
    """The way out for a non-model file: the checkpoint it belongs to, when graft can tell."""
    folder = path.parent
    reader = detect(folder)
    if reader is not None:
        return f"open the folder it belongs to: graft.open({str(folder)!r}) (format {reader.format!r})"
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if weights:
        return f"open the model's weights beside it: {folder / weights[0]}"
    return "point graft at the file that holds the model's weights"


def not_a_model(path: Path, obj) -> CheckpointError | None:
    """A CheckpointError saying what `obj` is, when it is a common non-model file."""
    what = what_it_is(obj)
    return None if what is None else CheckpointError(path, f"holds {what}", weights_beside(path))
