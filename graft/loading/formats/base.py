"""The reader interface every checkpoint format implements.

A reader knows names, shapes and dtypes from metadata alone, and reads only the tensors it
is asked for. Formats whose tensors are plain byte ranges of a file (safetensors, torch
zip files, DeepSpeed fp32 partitions...) describe them as `Span`s; the base class then
reads them with `reading.read_spans`, straight into the destination's memory. Low-level
failures become `CheckpointError`s through `failures.checkpoint_errors`.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Sequence

import torch

from graft.loading.formats.failures import checkpoint_errors
from graft.loading.formats.reading import Piece, Span, check_spans_fit, file_sizes, read_spans
from graft.storage import as_path


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16': how reports, JSON and manifests spell a dtype (`getattr(torch, name)` reads it back)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorMeta:
    """What is known of one checkpoint tensor before any of its bytes are read."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# Keys under which checkpointing code nests the model's state dict (torchtitan before its
# flat layout, Lightning, HF Trainer, most training scripts).
MODEL_CONTAINERS = ("state_dict", "model_state_dict", "model", "module")
# Where a torch file's top-level dict is searched for the state dict, in this order: also the
# names training scripts give the network itself. Not for DCP folders: their keys are
# flattened, so a group `net.` cannot be told from a submodule named `net`, and only the
# unambiguous MODEL_CONTAINERS count as nesting there.
CONTAINER_KEYS = MODEL_CONTAINERS + ("net", "network", "model_state", "params", "weights")


@dataclass(kw_only=True)
class OpenOptions:
    """Options of `graft.open`; each reader uses the ones that concern it (`Checkpoint.uses`)."""

    container: str | None = None
    """Torch files: the key (dotted for nesting) that holds the state dict; found if None."""
    allow_globals: Sequence[str] = ()
    """Torch files: qualified names of extra pickle globals to accept, rebuilt as inert
    stand-ins (no code from the file runs). The safe way past a blocked global."""
    trust_pickle: bool = False
    """Torch files: unpickle with weights_only=False. Runs code from the file: only for
    files you trust completely."""
    tag: str | None = None
    """DeepSpeed folders: the tag (e.g. 'global_step100'); the `latest` file if None."""
    model_index: int = 0
    """accelerate folders: which model of `save_state` (model.safetensors, model_1...)."""
    verify: str = "sha256"
    """graft run checkpoints: how completeness is checked, 'sha256' (every file's hash) or
    'sizes' (every file's size only: faster, blind to bytes changed in place)."""
    adapter_name: str | None = None
    """PEFT adapters: the adapter's name in the model's keys (`...lora_A.<name>.weight`), which
    the saved keys lack; found from the model's keys if None (a tie is suggested, not guessed)."""


OPEN_OPTIONS = tuple(f.name for f in fields(OpenOptions))


def reject_unknown_options(given: Iterable[str]) -> None:
    """A TypeError naming each option `graft.open` does not know (a typo would else go unnoticed)."""
    unknown = [name for name in given if name not in OPEN_OPTIONS]
    if unknown:
        close = {name: difflib.get_close_matches(name, OPEN_OPTIONS, n=1) for name in unknown}
        hints = "".join(f" ({name!r}: did you mean {near[0]!r}?)" for name, near in close.items() if near)
        raise TypeError(f"graft.open got unknown option(s) {unknown}{hints}; the options are format and"
                        f" {', '.join(OPEN_OPTIONS)} (see graft.loading.formats.OpenOptions)")


def warn_unused_options(ckpt: Checkpoint) -> None:
    """Warn about each option given (not at its default) that the opened reader never reads."""
    default, used = OpenOptions(), ckpt.options_used()
    ignored = {name: getattr(ckpt.options, name) for name in OPEN_OPTIONS
               if name not in used and getattr(ckpt.options, name) != getattr(default, name)}
    if ignored:
        given = ", ".join(f"{name}={value!r}" for name, value in ignored.items())
        warnings.warn(f"graft.open({str(ckpt.path)!r}): {given} ignored: it does not apply to a {ckpt.format}"
                      f" checkpoint, which uses {sorted(used) or 'none of the options'}", stacklevel=3)


class Checkpoint(ABC):
    """A lazily opened checkpoint: metadata now, tensor bytes only on request."""

    format: ClassVar[str]
    """Short name shown in reports: 'torch', 'safetensors', 'hf-index', ..."""
    describes: ClassVar[str]
    """What `graft.open` looks for to pick this reader (used in 'unknown format' errors)."""
    uses: ClassVar[frozenset[str]] = frozenset()
    """The `OpenOptions` fields this reader reads; `graft.open` warns about others given."""

    def __init__(self, path: str | os.PathLike, options: OpenOptions):
        self.path = as_path(path)
        self.options = options
        self.source: str | None = None
        """Where inside the checkpoint the weights came from (container key, master copy...)."""
        self.bytes_read = 0

    # -- discovery -----------------------------------------------------------------
    @classmethod
    @abstractmethod
    def can_open(cls, path: Path) -> bool:
        """Cheap test (suffix, a few magic bytes, marker files) that this reader applies."""

    # -- metadata ------------------------------------------------------------------
    @abstractmethod
    def keys(self) -> list[str]:
        """Every tensor name, from metadata only."""

    @abstractmethod
    def meta(self, key: str) -> TensorMeta:
        """Shape, dtype and file of one tensor; reads no tensor data."""

    def info(self) -> dict:
        """Facts for `graft inspect` and reports; readers add their own (tag, world size...)."""
        return {"format": self.format, "path": str(self.path), "source": self.source}

    def options_used(self) -> frozenset[str]:
        """`uses`, and, for a reader that opens others (folder formats, indexes), theirs too."""
        return self.uses

    # -- data ----------------------------------------------------------------------
    def span(self, key: str) -> Span | None:
        """The byte range of `key` if it is stored raw, contiguous and in one piece; None otherwise."""
        return None

    def pieces(self, key: str) -> list[Piece] | None:
        """The byte ranges `key` is stored in, each filling its own region of the destination's
        bytes (ZeRO partitions, DCP chunks); None if it is not stored as raw bytes.

        Most formats store a tensor in one piece: by default, its `span`.
        """
        span = self.span(key)
        return None if span is None else [Piece(span.file, span.offset, span.nbytes, 0)]

    def _materialize(self, key: str) -> torch.Tensor:
        """Readers without pieces return the tensor here (a CPU tensor, possibly mmap-backed)."""
        raise NotImplementedError(f"{type(self).__name__} has neither pieces nor _materialize")

    def _copy_into(self, key: str, out: torch.Tensor, on_bytes: Callable[[int], None] | None) -> int:
        """Fill `out` with `key`, which has no pieces; returns the bytes read.

        A copy of `_materialize(key)` here; a reader that can fill `out` part by part in
        less memory than a whole second tensor does so instead (DCP's strided or
        compressed chunks).
        """
        nbytes = self.meta(key).nbytes
        out.copy_(self._materialize(key).reshape(out.shape))
        if on_bytes:
            on_bytes(nbytes)
        return nbytes

    def validate(self, keys: Iterable[str]) -> None:
        """Check, before any copy starts, that every byte the keys need is on disk."""
        placed = [(key, piece) for key in keys for piece in self.pieces(key) or ()]
        check_spans_fit(placed, file_sizes({piece.file for _, piece in placed}))

    def tensor(self, key: str) -> torch.Tensor:
        """A CPU tensor with the checkpoint's values of `key` (fresh memory or a file view)."""
        meta = self.meta(key)
        out = torch.empty(meta.shape, dtype=meta.dtype)
        self.read_into([(key, out)])
        return out

    def read_into(
        self,
        requests: Sequence[tuple[str, torch.Tensor]],
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Fill each `out` (CPU, contiguous, the checkpoint's dtype and numel) with `key`.

        Every piece is read with pread straight into its region of `out`, all pieces of a
        file in one `read_spans` call, in offset order; tensors without pieces go through
        `_copy_into`.
        """
        with checkpoint_errors(self.path):
            by_file: dict[str, list[tuple[Span, torch.Tensor]]] = defaultdict(list)
            placed, rest = [], []
            for key, out in requests:
                meta = self.meta(key)
                assert out.device.type == "cpu" and out.is_contiguous(), key
                assert out.dtype == meta.dtype and out.numel() == meta.numel, key
                pieces = self.pieces(key)
                if pieces is None:
                    rest.append((key, out))
                    continue
                flat = out.view(-1).view(torch.uint8) if out.numel() else out
                for piece in pieces:
                    by_file[piece.file].append((piece, flat[piece.dest : piece.dest + piece.nbytes]))
                    placed.append((key, piece))
            # Every file's size again, right before the first byte lands in `out`: a file that
            # shrank since `validate` fails here with nothing written.
            check_spans_fit(placed, file_sizes(by_file))
            for key, out in rest:
                self.bytes_read += self._copy_into(key, out, on_bytes)
            for file, items in by_file.items():
                items.sort(key=lambda item: item[0].offset)
                self.bytes_read += read_spans(file, items, on_bytes)

    def close(self) -> None:
        """Release open files and maps."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
