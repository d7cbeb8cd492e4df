"""Match a checkpoint to a model from metadata alone: the dry run behind `graft.load`.

Every model key (parameters and persistent buffers) ends in exactly one bucket: load, new
or mismatch; every checkpoint key is either used or unexpected, each with its reason.
Key handling, in order: the user's rename rules (regex, applied in sequence); the inner
segment a reader says its keys lack (a PEFT adapter's name); then prefixes, chosen to
match the most keys and reported: the wrapper prefixes that DDP (`module.`), torch.compile
(`_orig_mod.`) and Lightning-style modules (`model.`) add on either side, and on top of them
one leading name on one side (`bert.`, `transformer.`, Lightning's `net.`...: a task model
around a base model, or the reverse), used only when it at least doubles the keys that match
and no other leading name comes close; otherwise the plan suggests the rename rule.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence, get_args

import torch

from graft.errors import PlanError
from graft.loading.formats.base import Checkpoint, dtype_name
from graft.loading.report import fmt_shape, render_plan

OnMismatch = Literal["skip", "error", "copy-overlap"]
ON_MISMATCH: tuple[str, ...] = get_args(OnMismatch)
"""The choices of `on_mismatch`, for the config, the CLI and the checks."""

# What torch's own wrappers put into parameter names: DDP and FSDP1 a leading `module.`,
# torch.compile `_orig_mod.` (leading, or inside a name for a compiled submodule).
DDP_PREFIX, COMPILED_SEGMENT = "module.", "_orig_mod."
# The prefixes the plan tries on either side when it aligns keys: torch's wrappers, and
# `model.`, which is no wrapper but what Lightning-style modules holding `self.model` save.
WRAPPER_PREFIXES = (DDP_PREFIX, COMPILED_SEGMENT, "model.")
COMPILED_PREFIX = re.compile(rf"(^|\.){re.escape(COMPILED_SEGMENT)}")
_TORCH_WRAPPERS = re.compile(
    rf"^({re.escape(DDP_PREFIX)}|{re.escape(COMPILED_SEGMENT)})+|(?<=\.){re.escape(COMPILED_SEGMENT)}")


def without_wrappers(name: str) -> str:
    """`name` without the segments torch's own wrappers add (not `model.`: in a live model that
    is a real submodule's name)."""
    return _TORCH_WRAPPERS.sub("", name)


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

    @property
    def reads_whole(self) -> bool:
        """The checkpoint's bytes fill this tensor in full (a tied key reads nothing itself)."""
        return bool(self.ckpt_key) and not self.tied_to and self.action == "load"

    @property
    def reads_bytes(self) -> bool:
        """Some of the checkpoint's bytes are read for this key: in full, or the overlap."""
        return bool(self.ckpt_key) and not self.tied_to and (self.action == "load" or self.partial)

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
    suggestions: list[str] = field(default_factory=list)
    """Rules graft did not apply on its own (ambiguous, or too small a gain) but that would help."""

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
        return {e.ckpt_key: k for k, e in self.entries.items() if e.reads_bytes}

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
            "suggestions": self.suggestions,
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
                    "dtype": dtype_name(e.dtype),
                    "checkpoint_shape": list(e.ckpt_shape) if e.ckpt_shape is not None else None,
                    "checkpoint_dtype": dtype_name(e.ckpt_dtype) if e.ckpt_dtype else None,
                }
                for k, e in self.entries.items()
            },
            "unexpected_reasons": self.unexpected,
        }

    def __str__(self) -> str:
        return render_plan(self)


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def model_tensors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """name -> (tensor, is_parameter) for everything the model's state dict holds."""
    params = {id(p) for p in model.parameters()}
    return {k: (v, id(v) in params) for k, v in model.state_dict(keep_vars=True).items()}


def without_prefix(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix):]
    return key


def apply_renames(keys: Iterable[str], rename: Sequence[tuple[str, str]], rules: list[str]) -> dict[str, str]:
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


def _score(a: dict[str, str], b: dict[str, str]) -> int:
    return len(set(a.values()) & set(b.values()))


def _strip_leading(names: dict[str, str], prefix: str, repeat: bool) -> dict[str, str] | None:
    """`names` with `prefix` stripped where it leads (repeatedly for wrappers); None if two
    keys would collapse into one."""
    stripped = {k: (without_prefix(v, prefix) if repeat else v.removeprefix(prefix)) for k, v in names.items()}
    return stripped if len(set(stripped.values())) == len(stripped) else None


def _lead_gains(names: dict[str, str], other: set[str]) -> dict[str, int]:
    """For each leading name ('bert.', 'net.'; wrapper prefixes aside), how many more of `names`
    meet `other` with it stripped: one pass over the keys, whatever the number of names."""
    gains: Counter = Counter()
    for v in names.values():
        head, dot, rest = v.partition(".")
        if dot and head + dot not in WRAPPER_PREFIXES:
            gains[head + dot] += (rest in other) - (v in other)
    return {name: gain for name, gain in gains.items() if gain > 0}


def _align_prefixes(ckpt_names: dict[str, str], model_names: dict[str, str], rules: list[str],
                    suggestions: list[str]):
    """Strip wrapper prefixes on whichever side makes the most keys meet, then at most one
    leading name on one side when that clearly helps; report what fired, suggest the rest."""

    def variants(names: dict[str, str]):
        out = [(None, names)]
        for prefix in WRAPPER_PREFIXES:
            if any(v.startswith(prefix) for v in names.values()):
                if (stripped := _strip_leading(names, prefix, repeat=True)) is not None:
                    out.append((prefix, stripped))
        return out

    best = None
    for cp, cn in variants(ckpt_names):
        for mp, mn in variants(model_names):
            score = _score(cn, mn)
            changes = (cp is not None) + (mp is not None)
            if best is None or (score, -changes) > (best[0], -best[1]):
                best = (score, changes, cp, cn, mp, mn)
    base, _, cp, cn, mp, mn = best
    if cp:
        n = sum(ckpt_names[k] != cn[k] for k in cn)
        rules.append(f"stripped wrapper prefix {cp!r} from {n} checkpoint keys")
    if mp:
        n = sum(model_names[k] != mn[k] for k in mn)
        rules.append(f"stripped wrapper prefix {mp!r} from {n} model keys")

    # One leading name on one side: a base model's checkpoint into its task model (the model's
    # keys have `bert.`), a task checkpoint into the base model, a Lightning module's attribute.
    leads = []
    for side, names, other in (("checkpoint", cn, mn), ("model", mn, cn)):
        for name, gain in _lead_gains(names, set(other.values())).items():
            leads.append((gain, side, name))
    if not leads:
        return cn, mn
    leads.sort(key=lambda lead: -lead[0])
    gain, side, name = leads[0]
    runner_up = leads[1][0] if len(leads) > 1 else 0
    stripped = _strip_leading(cn if side == "checkpoint" else mn, name, repeat=False)
    # Many more keys (at least double), unambiguously, and no two keys collapsing into one.
    if gain >= base and 2 * runner_up < gain and stripped is not None:
        n = sum(v != stripped[k] for k, v in (cn if side == "checkpoint" else mn).items())
        rules.append(f"stripped leading name {name!r} from {n} {side} keys ({base + gain} keys match"
                     f" with it, {base} without)")
        return (stripped, mn) if side == "checkpoint" else (cn, stripped)
    why = ("ambiguous: " if 2 * runner_up >= gain else
           "two keys would become one, check before using: " if stripped is None else "")
    for gain, side, name in leads[:2 if why else 1]:
        rule = (rf"(r'^{re.escape(name)}', '')" if side == "checkpoint" else f"(r'^', {name!r})")
        suggestions.append(f"{why}rename=[{rule}] would match {gain} more keys"
                           f" ({name!r} {'stripped from the checkpoint' if side == 'checkpoint' else 'as in the model'})")
    return cn, mn


def _removals(key: str):
    """(segment, the key without it) for each inner segment of `key`."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        yield parts[i], ".".join(parts[:i] + parts[i + 1:])


def insert_segment(ckpt_names: dict[str, str], model_names: dict[str, str], segment: dict,
                   rules: list[str], suggestions: list[str]) -> dict[str, str]:
    """Insert the one inner segment the model's keys have and the checkpoint's lack.

    A PEFT adapter is saved as `...query.lora_A.weight`, loaded as `...query.lora_A.default.weight`:
    the segment is whichever name, removed from model keys, explains the most checkpoint keys
    (`segment["name"]` when the user named it); a tie is suggested, not guessed.
    """
    if set(ckpt_names.values()) & set(model_names.values()):
        return ckpt_names  # the keys already carry it: nothing to insert
    wanted = set(ckpt_names.values())
    counts = Counter(seg for key in model_names.values() for seg, rest in _removals(key) if rest in wanted)
    top = counts.most_common(2)
    name = segment.get("name")
    if name is None and (len(top) == 1 or (len(top) == 2 and top[0][1] > top[1][1])):
        name = top[0][0]
    if name is None:
        if top:
            suggestions.append(f"the model has several {segment['what']}s that fit equally ({', '.join(sorted(counts))}):"
                               f" pass {segment['option']}= the one to load")
        return ckpt_names
    by_removal = {rest: key for key in model_names.values() for seg, rest in _removals(key) if seg == name}
    out = {ck: by_removal.get(t, t) for ck, t in ckpt_names.items()}
    if n := sum(out[ck] != ckpt_names[ck] for ck in out):
        rules.append(f"inserted {segment['what']} {name!r} into {n} checkpoint keys")
    return out


def first_match(patterns: Sequence[str], *names: str | None) -> str | None:
    for pattern in patterns:
        if any(n is not None and fnmatch.fnmatchcase(n, pattern) for n in names):
            return pattern
    return None


def _dtype_compatible(src: torch.dtype, dst: torch.dtype) -> bool:
    """Float <-> float (any width) casts; anything touching an integer or bool type must match."""
    if src == dst:
        return True
    return src.is_floating_point and dst.is_floating_point


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
    suggestions: list[str] = []

    ckpt_names = apply_renames(ckpt.keys(), rename, rules)
    if strip_prefixes:
        compiled = [k for k, v in ckpt_names.items() if COMPILED_PREFIX.search(v)]
        ckpt_names = {k: COMPILED_PREFIX.sub(r"\1", v) for k, v in ckpt_names.items()}
        model_names = {k: COMPILED_PREFIX.sub(r"\1", k) for k in tensors}
        if compiled:
            rules.append(f"stripped '_orig_mod.' (torch.compile) from {len(compiled)} checkpoint keys")
        if any(k != v for k, v in model_names.items()):
            rules.append("stripped '_orig_mod.' (torch.compile) from model keys")
        # A format whose keys lack one inner segment the model has (PEFT's adapter name).
        if isinstance(segment := ckpt.info().get("key_segment"), dict):
            ckpt_names = insert_segment(ckpt_names, model_names, segment, rules, suggestions)
        ckpt_names, model_names = _align_prefixes(ckpt_names, model_names, rules, suggestions)
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
        if (pattern := first_match(exclude, target, mk, ck)) is not None:
            entry.reason = f"excluded by {pattern!r}"
            continue
        if include and first_match(include, target, mk, ck) is None:
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
                entry.reason += f"; cast {dtype_name(meta.dtype)} -> {dtype_name(tensor.dtype)}"
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
                      info=ckpt.info(), suggestions=suggestions)
    result.bytes_to_read = sum(
        ckpt.meta(e.ckpt_key).nbytes for e in entries.values() if e.reads_bytes
    )
    return result
