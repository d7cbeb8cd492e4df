"""graft's own run checkpoints, read through the format's one owner (`graft.checkpointing.layout`).

A checkpoint folder, or a run folder (its newest complete checkpoint). The model's weights are
the logical tensors `model/<fqn>` of the manifest (version 2: pieces in every rank's shard
file, read straight into the destination, only the planned ones), or `model.safetensors`
(version 1, gathered). Completeness is the layout module's rule, the one `--resume auto`
uses: manifest, every file's size, and every file's hash (verify="sha256", the default; the
name stays for the option although version-2 manifests hash with BLAKE3) or sizes only
(verify="sizes"). `info()` gives the world size, strategy and layout of the saving run.
"""

from __future__ import annotations

import time
from pathlib import Path

from graft._logging import get_logger
from graft.checkpointing import layout
from graft.errors import CheckpointError
from graft.loading.formats.base import Checkpoint, OpenOptions, TensorMeta
from graft.loading.formats.reading import Span
from graft.loading.formats.safetensors_file import SafetensorsFile

log = get_logger(__name__)

VERIFY = ("sha256", "sizes")
"""What makes a run checkpoint complete for `graft.open(..., verify=)`: "sha256" (the default, the
rule resume uses: manifest, sizes and every file's hash) or "sizes" (manifest and sizes only)."""


class GraftRun(Checkpoint):
    """A run checkpoint, checked before use as `--resume auto` checks it. A run folder gives its
    newest complete checkpoint, newer broken ones skipped with a warning; a named checkpoint
    folder that fails the check is refused."""

    format = "graft"
    uses = frozenset({"verify"})
    describes = "a graft run checkpoint folder (manifest.json) or a run folder (checkpoints/)"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return layout.is_checkpoint_dir(path) or (layout.is_run_dir(path) and bool(layout.candidates(path)))

    def __init__(self, path, options: OpenOptions | None):
        super().__init__(path, options or OpenOptions())
        self.verify = self.options.verify
        if self.verify not in VERIFY:
            raise CheckpointError(self.path, f"verify={self.verify!r} is not a run-checkpoint check",
                                  f"use one of {list(VERIFY)}")
        started = time.perf_counter()
        self.folder, self.skipped = layout.resolve(self.path, hashes=self.verify == "sha256")
        self.verify_seconds = time.perf_counter() - started
        for folder, why in self.skipped:
            log.warning("skipping checkpoint %s: %s (as --resume auto does)", folder, why)
        self.manifest = layout.read_manifest(self.folder)
        self._legacy = None
        if self.manifest.version == layout.LEGACY_VERSION:
            self._legacy = SafetensorsFile(self.folder / layout.LEGACY_MODEL, self.options)
            self.source = layout.LEGACY_MODEL
        else:
            self.source = "model/* of the manifest"
            self._entries = {name[len(layout.MODEL_PREFIX):]: t for name, t in self.manifest.tensors.items()
                             if name.startswith(layout.MODEL_PREFIX)}
        if self.folder != self.path:
            self.source = f"{self.folder.relative_to(self.path)} ({self.source})"

    def keys(self) -> list[str]:
        return self._legacy.keys() if self._legacy else list(self._entries)

    def meta(self, key: str) -> TensorMeta:
        if self._legacy:
            return self._legacy.meta(key)
        t = self._entries[key]
        file = str(self.folder / t.pieces[0].file) if t.pieces else str(self.folder)
        return TensorMeta(key, t.shape, t.dtype, file)

    def span(self, key: str) -> Span | None:
        if self._legacy:
            return self._legacy.span(key)
        t = self._entries[key]
        if len(t.pieces) == 1:  # the whole tensor in one piece: a plain byte range
            p = t.pieces[0]
            return Span(str(self.folder / p.file), p.offset, t.numel * t.dtype.itemsize)
        return None

    def read_into(self, requests, on_bytes=None) -> None:
        if self._legacy:
            return super().read_into(requests, on_bytes)
        from graft.checkpointing.restore import read_ranges

        for key, out in requests:
            assert out.device.type == "cpu" and out.dtype == self._entries[key].dtype, key
        self.bytes_read += read_ranges(
            self.manifest, [(layout.model_name(k), 0, out.numel(), out.reshape(-1)) for k, out in requests],
            on_bytes=on_bytes)

    def info(self) -> dict:
        m = self.manifest
        return {**super().info(), "checkpoint": str(self.folder), "epoch": m.info.get("epoch"),
                "step": m.info.get("step"), "manifest_version": m.version, "world_size": m.world_size,
                "strategy": m.strategy, "layout": m.layout(), "verified": self.verify,
                "verify_seconds": round(self.verify_seconds, 3),
                "skipped": {p.name: why for p, why in self.skipped}}
