"""One writer per target format: the only place that knows how its format lays bytes out.

A writer is told every output tensor up front (names, shapes, dtypes: all a header, an
index or a pickle needs), says which files it will write (the dry run prints that), then
writes them from a `TensorStream` into a temporary path that `staging` publishes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

from graft.conversion.select import OutTensor
from graft.conversion.stream import TensorStream


@dataclass(frozen=True)
class OutFile:
    """One file of the output: its path relative to DST ('' when DST is the file), and its tensors."""

    name: str
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True, kw_only=True)
class WriteOptions:
    max_shard_size: int = 5 * 10**9
    """hf: the most tensor bytes per shard (a larger tensor gets a shard of its own), as HF counts."""
    dcp_key: str | None = None
    """dcp: nest the tensors under this key ('model': the older torchtitan layout); None: top level."""


class Writer(ABC):
    target: ClassVar[str]
    folder: ClassVar[bool]
    """Whether the output is a folder (hf, dcp) or one file (safetensors, torch)."""

    def __init__(self, tensors: Sequence[OutTensor], options: WriteOptions):
        self.tensors = list(tensors)
        self.options = options

    @abstractmethod
    def layout(self) -> list[OutFile]:
        """The files this writer will write and the tensors in each, from metadata only."""

    @abstractmethod
    def write(self, tmp: Path, stream: TensorStream) -> None:
        """Write the output at `tmp` (an empty folder when `folder`), every file fsynced."""


class OneFileWriter(Writer):
    """A target that is a single file holding every tensor (safetensors, torch)."""

    folder = False

    def layout(self) -> list[OutFile]:
        return [OutFile("", tuple(self.tensors))]


# Imported on demand: the DCP writer pulls in torch.distributed.checkpoint, which the
# other targets do not need.
WRITERS = {"safetensors": "safetensors:SafetensorsWriter", "hf": "hf:HFWriter", "dcp": "dcp:DCPWriter",
           "torch": "torch_zip:TorchWriter"}


def writer_for(target: str) -> type[Writer]:
    import importlib

    module, _, name = WRITERS[target].partition(":")
    return getattr(importlib.import_module(f"graft.conversion.writers.{module}"), name)
