"""ConvertReport: what a conversion wrote (or, as a dry run, would write), for people and machines."""

from __future__ import annotations

from dataclasses import dataclass, field

from graft.conversion.select import Selection
from graft.conversion.writers import OutFile
from graft.loading.formats.base import dtype_name
from graft.loading.report import fmt_shape, human_bytes


@dataclass
class ConvertReport:
    src: str
    dst: str
    to: str
    source_format: str
    source: str | None
    selection: Selection
    files: list[OutFile]
    dry_run: bool
    buffer_bytes: int
    """Peak extra memory of the stream: the read buffer plus the cast buffer."""
    bytes_read: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def bytes_written(self) -> int:
        return sum(f.nbytes for f in self.files)

    def to_dict(self) -> dict:
        tensors = self.selection.tensors
        return {
            "src": self.src, "dst": self.dst, "to": self.to, "dry_run": self.dry_run,
            "source_format": self.source_format, "source": self.source, "source_info": self.info,
            "tensors": len(tensors), "bytes": self.bytes_written, "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3), "buffer_bytes": self.buffer_bytes,
            "rules": self.selection.rules, "casts": self.selection.casts,
            "dropped": self.selection.dropped,
            "files": [{"name": f.name or ".", "bytes": f.nbytes, "tensors": len(f.tensors)} for f in self.files],
            "keys": {t.name: {"source_key": t.source_key, "shape": list(t.shape),
                              "dtype": dtype_name(t.dtype),
                              "source_dtype": dtype_name(t.source_dtype),
                              "file": f.name or "."}
                     for f in self.files for t in f.tensors},
        }

    def __str__(self) -> str:
        sel = self.selection
        verb = "would write" if self.dry_run else "wrote"
        lines = [f"graft convert: {self.src} ({self.source_format}"
                 + (f", from {self.source}" if self.source else "") + f") -> {self.dst} ({self.to})"]
        lines.append(f"  {verb:12s} {len(sel.tensors)} tensors, {human_bytes(self.bytes_written)}"
                     f" in {len(self.files)} file(s)")
        for rule in sel.rules:
            lines.append(f"  {'rule':12s} {rule}")
        for change, n in sel.casts.items():
            lines.append(f"  {'dtype':12s} {change}: {n} tensors")
        if sel.dropped:
            reasons: dict[str, int] = {}
            for reason in sel.dropped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            lines.append(f"  {'dropped':12s} {len(sel.dropped)} keys: "
                         + ", ".join(f"{n} {reason}" for reason, n in reasons.items()))
        if self.dry_run:
            for f in self.files:
                lines.append(f"  {f.name or self.dst}: {len(f.tensors)} tensors, {human_bytes(f.nbytes)}")
                for t in f.tensors:
                    origin = f" <- {t.source_key}" if t.source_key != t.name else ""
                    cast = f" (from {dtype_name(t.source_dtype)})" if t.cast else ""
                    lines.append(f"    {t.name} {fmt_shape(t.shape)} {dtype_name(t.dtype)}{cast}{origin}")
        else:
            if len(self.files) > 1:
                for f in self.files:
                    lines.append(f"  {'file':12s} {f.name}: {len(f.tensors)} tensors, {human_bytes(f.nbytes)}")
            rate = self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0
            lines.append(f"  {'time':12s} {self.seconds:.2f} s (read {human_bytes(self.bytes_read)}, {rate:.2f} GB/s);"
                         f" buffer {human_bytes(self.buffer_bytes)}")
        return "\n".join(lines)
