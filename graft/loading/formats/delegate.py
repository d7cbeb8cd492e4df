"""A folder format whose weights are one file (or index) that another reader opens.

accelerate, transformers, HF Trainer and PEFT folders differ only in which file inside them
holds the weights and what they say about it (step, adapter, ...); the reading itself is the
inner reader's. Subclasses set `self.inner` and `self.source` and add their own `info()`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from graft.loading.formats.base import Checkpoint, TensorMeta
from graft.loading.formats.reading import Piece, Span


class Delegating(Checkpoint):
    """Every metadata and data call goes to `self.inner`, the reader of the weights file."""

    inner: Checkpoint

    def keys(self) -> list[str]:
        return self.inner.keys()

    def meta(self, key: str) -> TensorMeta:
        return self.inner.meta(key)

    def inner_info(self) -> dict:
        """The inner reader's own facts, as `weights_<name>` (format, path and source are ours)."""
        inner = {k: v for k, v in self.inner.info().items() if k not in ("format", "path", "source")}
        return {f"weights_{k}": v for k, v in inner.items() if v is not None and k != "metadata"}

    def options_used(self) -> frozenset[str]:
        return self.uses | self.inner.options_used()

    def span(self, key: str) -> Span | None:
        return self.inner.span(key)

    def pieces(self, key: str) -> list[Piece] | None:
        return self.inner.pieces(key)

    def _materialize(self, key: str) -> torch.Tensor:
        return self.inner._materialize(key)

    def validate(self, keys: Iterable[str]) -> None:
        self.inner.validate(keys)

    def read_into(
        self,
        requests: Sequence[tuple[str, torch.Tensor]],
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        before = self.inner.bytes_read
        self.inner.read_into(requests, on_bytes)
        self.bytes_read += self.inner.bytes_read - before

    def close(self) -> None:
        self.inner.close()
