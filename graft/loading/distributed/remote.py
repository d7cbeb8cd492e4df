"""What rank 0 sends once it has planned (strategy "broadcast"), and the checkpoint stand-in
the other ranks plan against: names, shapes and dtypes, no file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from graft.errors import GraftError, PlanError
from graft.loading.formats.base import Checkpoint, OpenOptions, TensorMeta
from graft.loading.plan import LoadPlan


@dataclass
class Rank0Plan:
    """Rank 0's checkpoint metadata, plan and read order: every other rank plans its own
    model against the metadata, compares with `plan`, and receives the stream in `order`."""

    path: str
    format: str
    source: str | None
    info: dict
    metas: dict[str, tuple | None]
    """Every key name; (shape, dtype, file) of the keys rank 0's plan looked at, None for the
    others (asking a sharded reader for those would open shards the plan never needed)."""
    plan: LoadPlan
    buffers: dict[str, tuple]
    """Rank 0's non-persistent buffers: name -> (shape, dtype)."""
    order: list[str]
    """Model keys of the tensors loaded in full, in the order their bytes lie in the files,
    so rank 0 reads sequentially."""

    @classmethod
    def of(cls, ckpt: Checkpoint, plan: LoadPlan, buffers: dict[str, tuple]) -> Rank0Plan:
        consulted = {e.ckpt_key for e in plan.entries.values() if e.ckpt_key and e.ckpt_shape is not None}
        metas = {}
        for k in ckpt.keys():
            if k in consulted:
                m = ckpt.meta(k)
                metas[k] = (tuple(m.shape), m.dtype, m.file)
            else:
                metas[k] = None
        return cls(str(ckpt.path), ckpt.format, ckpt.source, ckpt.info(), metas, plan, buffers,
                   _read_order(plan, ckpt))


def _read_order(plan: LoadPlan, ckpt: Checkpoint) -> list[str]:
    keyed = []
    for i, e in enumerate(e for e in plan.entries.values() if e.reads_whole):
        span = ckpt.span(e.ckpt_key)
        keyed.append(((0, span.file, span.offset) if span else (1, "", i), e.model_key))
    return [mk for _, mk in sorted(keyed)]


class RemoteCheckpoint(Checkpoint):
    """The metadata rank 0 sent: names, shapes, dtypes. Reads nothing, opens nothing."""

    format = "remote"
    describes = "metadata received from rank 0"

    def __init__(self, sent: Rank0Plan):
        # No file checks: this path may not exist on this rank.
        super().__init__(sent.path, OpenOptions())
        self.format = sent.format  # shadows the class attribute: reports show rank 0's format
        self.source = sent.source
        self.sent = sent

    @classmethod
    def can_open(cls, path) -> bool:
        return False

    def keys(self) -> list[str]:
        return list(self.sent.metas)

    def meta(self, key: str) -> TensorMeta:
        if self.sent.metas[key] is None:
            raise PlanError(f"{self.path}: this rank's model wants {key!r}, which rank 0's model does not"
                            " (the models differ)")
        shape, dtype, file = self.sent.metas[key]
        return TensorMeta(key, shape, dtype, file)

    def info(self) -> dict:
        return dict(self.sent.info)

    def validate(self, keys: Iterable[str]) -> None:
        """Nothing to check here: rank 0 validated the files, and this rank reads none."""

    def _materialize(self, key: str) -> torch.Tensor:
        raise GraftError(f"{key!r}: ranks other than 0 never read the checkpoint (internal error)")
