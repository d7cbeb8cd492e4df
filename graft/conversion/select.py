"""Which tensors a conversion writes, under which names and dtypes: decided from metadata alone.

The loading core's own key rules, in its order: the user's rename rules (regex, in
sequence), then wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile,
`model.` from Lightning-style modules), then include/exclude globs matched against the
new name or the checkpoint's own. There is no model to align prefixes against here, so
stripping is asked for: automatic (`strip_prefix=True`: torch.compile's segment anywhere,
and each wrapper prefix that EVERY key carries, so a real `model.` namespace next to a
`lm_head` is never touched) or by naming the prefixes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from graft.errors import PlanError
from graft.loading.formats.base import Checkpoint, TensorMeta, dtype_name
from graft.loading.plan import COMPILED_PREFIX, WRAPPER_PREFIXES, apply_renames, first_match, without_prefix

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its new name, the checkpoint tensor it comes from, its output dtype."""

    name: str
    source: TensorMeta
    dtype: torch.dtype

    @property
    def source_key(self) -> str:
        return self.source.key

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def source_dtype(self) -> torch.dtype:
        return self.source.dtype

    @property
    def source_nbytes(self) -> int:
        return self.source.nbytes

    @property
    def nbytes(self) -> int:
        return self.source.numel * self.dtype.itemsize

    @property
    def cast(self) -> bool:
        return self.dtype != self.source.dtype


@dataclass
class Selection:
    tensors: list[OutTensor]
    dropped: dict[str, str]
    """Checkpoint keys left out, with the reason (the pattern that excluded them)."""
    rules: list[str] = field(default_factory=list)
    """Every rename or prefix rule that changed keys, with how many."""

    @property
    def casts(self) -> dict[str, int]:
        """'float32 -> bfloat16' -> number of tensors cast that way."""
        return dict(Counter(f"{dtype_name(t.source_dtype)} -> {dtype_name(t.dtype)}" for t in self.tensors if t.cast))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PlanError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _strip_prefixes(names: dict[str, str], strip: bool | str | Sequence[str], rules: list[str]) -> dict[str, str]:
    if strip is False or strip is None:
        return names
    if strip is True:
        compiled = sum(bool(COMPILED_PREFIX.search(v)) for v in names.values())
        names = {k: COMPILED_PREFIX.sub(r"\1", v) for k, v in names.items()}
        if compiled:
            rules.append(f"stripped '_orig_mod.' (torch.compile) from {compiled} keys")
        prefixes = [p for p in WRAPPER_PREFIXES if names and all(v.startswith(p) for v in names.values())]
    else:
        prefixes = [strip] if isinstance(strip, str) else list(strip)
    for prefix in prefixes:
        stripped = {k: without_prefix(v, prefix) for k, v in names.items()}
        n = sum(stripped[k] != names[k] for k in names)
        if n:
            rules.append(f"stripped wrapper prefix {prefix!r} from {n} keys")
        names = stripped
    return names


def select(
    ckpt: Checkpoint,
    *,
    rename: Sequence[tuple[str, str]] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    strip_prefix: bool | str | Sequence[str] = False,
    dtype: str | torch.dtype | None = None,
) -> Selection:
    """The output tensors of converting `ckpt`, in the checkpoint's key order; reads no tensor."""
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include/exclude take a list of glob patterns, e.g. exclude=['optimizer.*']")
    target = resolve_dtype(dtype)
    rules: list[str] = []
    names = apply_renames(ckpt.keys(), [tuple(r) for r in rename], rules)
    names = _strip_prefixes(names, strip_prefix, rules)

    tensors, dropped, seen = [], {}, {}
    for key, name in names.items():
        if (pattern := first_match(exclude, name, key)) is not None:
            dropped[key] = f"excluded by {pattern!r}"
            continue
        if include and first_match(include, name, key) is None:
            dropped[key] = "not matched by include"
            continue
        if name in seen:
            raise PlanError(f"{ckpt.path}: checkpoint keys {seen[name]!r} and {key!r} both become {name!r}"
                            f" (rules: {rules or 'none'})"
                            "\n  way out: add a rename rule or an exclude pattern that keeps only one")
        seen[name] = key
        meta = ckpt.meta(key)
        # Only floats change width: an integer counter or a bool mask keeps its meaning.
        out_dtype = target if target is not None and meta.dtype.is_floating_point else meta.dtype
        tensors.append(OutTensor(name, meta, out_dtype))
    if not tensors:
        raise PlanError(f"{ckpt.path}: nothing to write: all {len(names)} keys were left out"
                        f" ({', '.join(sorted(set(dropped.values()))) or 'no tensors in the checkpoint'})"
                        "\n  way out: check --include/--exclude against `graft inspect`")
    return Selection(tensors, dropped, rules)
