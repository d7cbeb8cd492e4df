"""LoadReport: what a load did, as a table for people and JSON for machines."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graft.loading.formats.base import dtype_name

if TYPE_CHECKING:  # plan renders itself with `render_plan`: only plan imports report
    from graft.loading.plan import LoadPlan


def fmt_shape(shape) -> str:
    """'(102, 4096)', the way reports and errors show a shape; '-' when unknown."""
    return "(" + ", ".join(map(str, shape)) + ")" if shape is not None else "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _group(keys: list[str], depth: int = 1) -> str:
    """'features (26), classifier (4)': long key lists, grouped by their leading segment."""
    groups: dict[str, int] = defaultdict(int)
    for k in keys:
        groups[".".join(k.split(".")[:depth])] += 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items())


def shown_unexpected(plan: LoadPlan) -> tuple[dict[str, str], int]:
    """The unexpected checkpoint keys a table lists, and how many it leaves out: a key that feeds
    a mismatched model key is already shown there, with the same reason (the JSON keeps all)."""
    mismatched = {e.ckpt_key for e in plan.entries.values() if e.action == "mismatch" and e.ckpt_key}
    shown = {k: r for k, r in plan.unexpected.items() if k not in mismatched}
    return shown, len(plan.unexpected) - len(shown)


def render_plan(plan: LoadPlan, title: str = "dry run") -> str:
    """The plan as a table: one row per model key, then the unexpected checkpoint keys."""
    where = f"{plan.format}" + (f", weights at {plan.source!r}" if plan.source else "")
    lines = [f"graft {title}: {plan.path} ({where})"]
    for rule in plan.rules:
        lines.append(f"  rule: {rule}")
    for hint in plan.suggestions:
        lines.append(f"  suggestion: {hint}")
    lines.append(
        f"  {len(plan.loaded)} loaded, {len(plan.new)} new, {len(plan.mismatched)} mismatched"
        f" ({len(plan.partial)} partial), {len(plan.unexpected)} unexpected;"
        f" coverage {plan.coverage:.1%} of parameters; {human_bytes(plan.bytes_to_read)} to read"
    )
    rows = [("status", "model key", "shape", "dtype", "note")]
    for k, e in plan.entries.items():
        status = {"load": "loaded", "new": "new", "mismatch": "mismatched"}[e.action]
        if e.partial:
            status = "partial"
        rows.append((status, k, fmt_shape(e.shape), dtype_name(e.dtype), e.reason))
    shown, _ = shown_unexpected(plan)
    for ck, reason in shown.items():
        rows.append(("unexpected", ck, "", "", reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return "\n".join(lines)


@dataclass
class LoadReport:
    """What `graft.load` did. Every model key is in exactly one of loaded / new / mismatched;
    every checkpoint key is in `used` or `unexpected`."""

    plan: LoadPlan
    bytes_read: int
    seconds: float
    frozen: list[str] = field(default_factory=list)

    # The buckets, straight from the plan.
    @property
    def loaded(self) -> list[str]:
        return self.plan.loaded

    @property
    def new(self) -> list[str]:
        return self.plan.new

    @property
    def mismatched(self) -> list[str]:
        return self.plan.mismatched

    @property
    def partial(self) -> list[str]:
        return self.plan.partial

    @property
    def unexpected(self) -> list[str]:
        return list(self.plan.unexpected)

    @property
    def used(self) -> dict[str, str]:
        return self.plan.used

    @property
    def casts(self) -> list[str]:
        return self.plan.casts

    @property
    def renames(self) -> list[str]:
        return self.plan.rules

    @property
    def coverage(self) -> float:
        return self.plan.coverage

    @property
    def format(self) -> str:
        return self.plan.format

    @property
    def source(self) -> str | None:
        return self.plan.source

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "bytes_read": self.bytes_read, "seconds": self.seconds,
                "frozen": self.frozen}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        p = self.plan
        rate = self.bytes_read / self.seconds if self.seconds > 0 else 0.0
        where = p.format + (f", weights at {p.source!r}" if p.source else "")
        lines = [f"graft load: {p.path} ({where})"]
        for rule in p.rules:
            lines.append(f"  rule        {rule}")
        for hint in p.suggestions:
            lines.append(f"  suggestion  {hint}")
        lines.append(f"  loaded      {len(p.loaded):4d}  {_group(p.loaded)}")
        for k in p.casts:
            e = p.entries[k]
            lines.append(f"    cast      {k}: {dtype_name(e.ckpt_dtype)} -> {dtype_name(e.dtype)}")
        lines.append(f"  new         {len(p.new):4d}  " + ", ".join(
            f"{k} ({p.entries[k].reason})" if p.entries[k].reason != "not in checkpoint" else k for k in p.new))
        lines.append(f"  mismatched  {len(p.mismatched):4d}")
        for k in p.mismatched:
            lines.append(f"    {k}: {p.entries[k].reason}")
        shown, left_out = shown_unexpected(p)
        also = f"  (and the {left_out} checkpoint key(s) of the mismatched keys above)" if left_out else ""
        lines.append(f"  unexpected  {len(shown):4d}{also}")
        for k, reason in shown.items():
            lines.append(f"    {k}: {reason}")
        lines.append(f"  coverage    {p.coverage:.1%} of model parameters (by numel)")
        lines.append(f"  read        {human_bytes(self.bytes_read)} in {self.seconds:.2f} s"
                     f" ({human_bytes(rate)}/s)")
        if self.frozen:
            lines.append(f"  frozen      {len(self.frozen):4d}  {_group(self.frozen)}")
        return "\n".join(lines)
