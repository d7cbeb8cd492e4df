"""Match a checkpoint to a model from metadata alone: the dry run behind `graft.load`.

Every model key (parameters and persistent buffers) ends in exactly one bucket: load, new
or mismatch; every checkpoint key is either used or unexpected, each with its reason.
Key handling, in order: the user's rename rules (regex, applied in sequence), then the
wrapper prefixes that DDP (`module.`), torch.compile (`_orig_mod.`) and Lightning-style
modules (`model.`) add on either side, chosen to match the most keys, and reported.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

import torch

from graft.errors import PlanError
from graft.loading.formats.base import Checkpoint

OnMismatch = Literal["skip", "error", "copy-overlap"]
ON_MISMATCH = ("skip", "error", "copy-overlap")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_COMPILED = re.compile(r"(^|\.)_orig_mod\.")


@dataclass
class Entry:
    """The fate of one model key."""

    model_key: str
    action: Literal["load", "new", "mismatch"]
    reason: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_param: bool
    ckpt_key: str | None = None
    ckpt_shape: tuple[int, ...] | None = None
    ckpt_dtype: torch.dtype | None = None
    partial: bool = False
    """copy-overlap: the overlapping slice is copied, the rest keeps the model's values."""
    tied_to: str | None = None
    """Loaded through another key that shares this tensor (tied weights): nothing read."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def cast(self) -> bool:
        return self.ckpt_dtype is not None and self.ckpt_dtype != self.dtype

    def overlap(self) -> tuple[slice, ...]:
        return tuple(slice(0, min(a, b)) for a, b in zip(self.shape, self.ckpt_shape))


@dataclass
class LoadPlan:
    """What `graft.load` will do, known before one tensor is read."""

    path: str
    format: str
    source: str | None
    entries: dict[str, Entry]
    unexpected: dict[str, str]
    """Checkpoint keys that feed nothing, with the reason."""
    rules: list[str]
    """Every rename or prefix rule that changed a key, with how many keys it changed."""
    on_mismatch: str
    bytes_to_read: int = 0
    info: dict = field(default_factory=dict)

    def _keys(self, action: str) -> list[str]:
        return [k for k, e in self.entries.items() if e.action == action]

    @property
    def loaded(self) -> list[str]:
        return self._keys("load")

    @property
    def new(self) -> list[str]:
        return self._keys("new")

    @property
    def mismatched(self) -> list[str]:
        return self._keys("mismatch")

    @property
    def partial(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.partial]

    @property
    def casts(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.action == "load" and e.cast]

    @property
    def used(self) -> dict[str, str]:
        """checkpoint key -> model key, for every checkpoint key something is copied from."""
        return {e.ckpt_key: k for k, e in self.entries.items()
                if e.ckpt_key and (e.action == "load" or e.partial) and not e.tied_to}

    @property
    def coverage(self) -> float:
        """Share of the model's parameters, by numel, that are loaded in full."""
        total = sum(e.numel for e in self.entries.values() if e.is_param)
        done = sum(e.numel for e in self.entries.values() if e.is_param and e.action == "load")
        return done / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "source": self.source,
            "info": {k: v for k, v in self.info.items() if _jsonable(v)},
            "on_mismatch": self.on_mismatch,
            "rules": self.rules,
            "coverage": self.coverage,
            "bytes_to_read": self.bytes_to_read,
            "loaded": self.loaded,
            "new": self.new,
            "mismatched": self.mismatched,
            "partial": self.partial,
            "unexpected": list(self.unexpected),
            "keys": {
                k: {
                    "action": e.action,
                    "reason": e.reason,
                    "checkpoint_key": e.ckpt_key,
                    "shape": list(e.shape),
                    "dtype": str(e.dtype).removeprefix("torch."),
                    "checkpoint_shape": list(e.ckpt_shape) if e.ckpt_shape is not None else None,
                    "checkpoint_dtype": str(e.ckpt_dtype).removeprefix("torch.") if e.ckpt_dtype else None,
                }
                for k, e in self.entries.items()
            },
            "unexpected_reasons": self.unexpected,
        }

    def __str__(self) -> str:
        from graft.loading.report import render_plan

        return render_plan(self)


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def model_tensors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """name -> (tensor, is_parameter) for everything the model's state dict holds."""
    params = {id(p) for p in model.parameters()}
    return {k: (v, id(v) in params) for k, v in model.state_dict(keep_vars=True).items()}


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix):]
    return key


def _apply_renames(keys: Iterable[str], rename: Sequence[tuple[str, str]], rules: list[str]) -> dict[str, str]:
    compiled = [(re.compile(p), r, p) for p, r in rename]
    fired: Counter = Counter()
    out = {}
    for key in keys:
        new = key
        for regex, repl, pattern in compiled:
            renamed = regex.sub(repl, new)
            if renamed != new:
                fired[(pattern, repl)] += 1
                new = renamed
        out[key] = new
    for pattern, repl in rename:
        if fired[(pattern, repl)]:
            rules.append(f"rename {pattern!r} -> {repl!r} on {fired[(pattern, repl)]} checkpoint keys")
    return out


def _align_prefixes(ckpt_names: dict[str, str], model_names: dict[str, str], rules: list[str]):
    """Strip wrapper prefixes on whichever side makes the most keys meet; report what fired."""

    def variants(names: dict[str, str]):
        out = [(None, names)]
        for prefix in WRAPPER_PREFIXES:
            if any(v.startswith(prefix) for v in names.values()):
                stripped = {k: _strip(v, prefix) for k, v in names.items()}
                if len(set(stripped.values())) == len(stripped):  # no two keys collapse
                    out.append((prefix, stripped))
        return out

    best = None
    for cp, cn in variants(ckpt_names):
        for mp, mn in variants(model_names):
            score = len(set(cn.values()) & set(mn.values()))
            changes = (cp is not None) + (mp is not None)
            if best is None or (score, -changes) > (best[0], -best[1]):
                best = (score, changes, cp, cn, mp, mn)
    _, _, cp, cn, mp, mn = best
    if cp:
        n = sum(ckpt_names[k] != cn[k] for k in cn)
        rules.append(f"stripped wrapper prefix {cp!r} from {n} checkpoint keys")
    if mp:
        n = sum(model_names[k] != mn[k] for k in mn)
        rules.append(f"stripped wrapper prefix {mp!r} from {n} model keys")
    return cn, mn


def _matches(patterns: Sequence[str], *names: str | None) -> str | None:
    for pattern in patterns:
        if any(n is not None and fnmatch.fnmatchcase(n, pattern) for n in names):
            return pattern
    return None


def _dtype_compatible(src: torch.dtype, dst: torch.dtype) -> bool:
    """Float <-> float (any width) casts; anything touching an integer or bool type must match."""
    if src == dst:
        return True
    return src.is_floating_point and dst.is_floating_point


def fmt_shape(shape) -> str:
    """'(102, 4096)', the way reports and errors show a shape; '-' when unknown."""
    return "(" + ", ".join(map(str, shape)) + ")" if shape is not None else "-"


def plan(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    *,
    rename: Sequence[tuple[str, str]] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    on_mismatch: OnMismatch = "skip",
    strip_prefixes: bool = True,
    tensors: Mapping[str, tuple[torch.Tensor, bool]] | None = None,
) -> LoadPlan:
    """Decide, for each model key, whether it loads, is new, or mismatches; read no tensor."""
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch={on_mismatch!r}; choose one of {ON_MISMATCH}")
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include/exclude take a list of glob patterns, e.g. exclude=['classifier.6.*']")
    rename = [tuple(r) for r in rename]
    tensors = model_tensors(model) if tensors is None else tensors
    rules: list[str] = []

    ckpt_names = _apply_renames(ckpt.keys(), rename, rules)
    if strip_prefixes:
        compiled = [k for k, v in ckpt_names.items() if _COMPILED.search(v)]
        ckpt_names = {k: _COMPILED.sub(r"\1", v) for k, v in ckpt_names.items()}
        model_names = {k: _COMPILED.sub(r"\1", k) for k in tensors}
        if compiled:
            rules.append(f"stripped '_orig_mod.' (torch.compile) from {len(compiled)} checkpoint keys")
        if any(k != v for k, v in model_names.items()):
            rules.append("stripped '_orig_mod.' (torch.compile) from model keys")
        ckpt_names, model_names = _align_prefixes(ckpt_names, model_names, rules)
    else:
        model_names = {k: k for k in tensors}

    # Target name -> checkpoint keys landing there; two on one target is ambiguous.
    by_target: dict[str, list[str]] = defaultdict(list)
    for ck, target in ckpt_names.items():
        by_target[target].append(ck)
    model_by_target = {v: k for k, v in model_names.items()}
    for target, cks in by_target.items():
        if len(cks) > 1 and target in model_by_target:
            raise PlanError(
                f"{ckpt.path}: checkpoint keys {cks[0]!r} and {cks[1]!r} both map to model key"
                f" {model_by_target[target]!r} (rules: {rules or 'none'})"
                "\n  way out: add a rename rule or an exclude pattern that keeps only one"
            )

    entries: dict[str, Entry] = {}
    unexpected: dict[str, str] = {}
    errors: list[str] = []
    for mk, (tensor, is_param) in tensors.items():
        target = model_names[mk]
        entry = Entry(mk, "new", "not in checkpoint", tuple(tensor.shape), tensor.dtype, is_param)
        entries[mk] = entry
        cks = by_target.get(target)
        if not cks:
            continue
        ck = cks[0]
        entry.ckpt_key = ck
        if (pattern := _matches(exclude, target, mk, ck)) is not None:
            entry.reason = f"excluded by {pattern!r}"
            continue
        if include and _matches(include, target, mk, ck) is None:
            entry.reason = "not matched by include"
            continue
        meta = ckpt.meta(ck)
        entry.ckpt_shape, entry.ckpt_dtype = meta.shape, meta.dtype
        same_shape = tuple(meta.shape) == entry.shape
        if not _dtype_compatible(meta.dtype, tensor.dtype):
            entry.action = "mismatch"
            entry.reason = (f"dtype {meta.dtype} in checkpoint vs {tensor.dtype} in model"
                            " (integer/bool <-> float is never cast)")
            errors.append(f"{mk}: {entry.reason}")
        elif same_shape:
            entry.action = "load"
            entry.reason = "same name" if ck == mk else f"from {ck!r}"
            if entry.cast:
                entry.reason += f"; cast {str(meta.dtype)[6:]} -> {str(tensor.dtype)[6:]}"
        else:
            entry.action = "mismatch"
            entry.reason = f"shape {fmt_shape(entry.shape)} in model vs {fmt_shape(meta.shape)} in checkpoint"
            if on_mismatch == "copy-overlap" and len(meta.shape) == len(entry.shape):
                entry.partial = True
                entry.reason += f"; overlap {fmt_shape(min(a, b) for a, b in zip(entry.shape, meta.shape))} copied"
            else:
                errors.append(f"{mk}: {entry.reason}")

    if on_mismatch == "error" and errors:
        raise PlanError(
            f"{ckpt.path}: {len(errors)} key(s) do not fit the model:\n  " + "\n  ".join(errors)
            + "\n  way out: on_mismatch='skip' (keep the model's values) or 'copy-overlap',"
            " or exclude=[...] these keys"
        )

    # Tied weights: a model key sharing its tensor with a loaded key is loaded by it.
    loaded_by_ptr = {}
    for mk, e in entries.items():
        t = tensors[mk][0]
        if e.action == "load" and t.device.type != "meta":
            loaded_by_ptr.setdefault((t.data_ptr(), t.shape, t.stride()), mk)
    for mk, e in entries.items():
        t = tensors[mk][0]
        if e.action == "new" and e.ckpt_key is None and t.device.type != "meta":
            src = loaded_by_ptr.get((t.data_ptr(), t.shape, t.stride()))
            if src is not None:
                e.action, e.tied_to, e.reason = "load", src, f"tied to {src!r}"

    used = {e.ckpt_key for e in entries.values() if e.ckpt_key and (e.action == "load" or e.partial)}
    for ck, target in ckpt_names.items():
        if ck in used:
            continue
        mk = model_by_target.get(target)
        if mk is None:
            unexpected[ck] = "no such key in the model" + (f" (looked for {target!r})" if target != ck else "")
        elif entries[mk].ckpt_key != ck:
            unexpected[ck] = f"another checkpoint key already feeds {mk!r}"
        else:
            unexpected[ck] = f"{entries[mk].reason} ({mk!r})"

    result = LoadPlan(str(ckpt.path), ckpt.format, ckpt.source, entries, unexpected, rules, on_mismatch,
                      info=ckpt.info())
    result.bytes_to_read = sum(
        ckpt.meta(e.ckpt_key).nbytes for e in entries.values()
        if e.ckpt_key and not e.tied_to and (e.action == "load" or e.partial)
    )
    return result
