"""graft's own run checkpoints: a checkpoint folder, or a run folder (its newest complete checkpoint).

    RUN_DIR/checkpoints/epoch_000005/            one checkpoint (5 epochs done)
    RUN_DIR/checkpoints/epoch_000005_step_000123/  mid-epoch (preemption), global step 123
        model.safetensors   full weights (unwrapped names)
        manifest.json       written last: each file's size and sha256; its presence marks
                            the checkpoint complete

The layout helpers live here, beside the reader, so the trainer (which writes these
folders) and `graft.open` (which reads them) agree on one definition of "complete":
`problem()` (manifest, then every file's size, then every file's sha256), and for a run
folder `newest_complete()` (the newest checkpoint without a problem; newer ones are skipped,
each with its reason). `--resume auto` and `graft.open(RUN_DIR)` both use them with every
hash checked, so both pick the same checkpoint. `graft.open(path, verify="sizes")` is the
documented cheaper check (no data read: a same-size corruption goes unnoticed); `info()`
says which check was made ("verified") and what was skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from graft._logging import get_logger
from graft.errors import CheckpointError
from graft.loading.formats.base import Checkpoint, OpenOptions, Span, TensorMeta
from graft.loading.formats.safetensors_file import SafetensorsFile

log = get_logger(__name__)

MANIFEST = "manifest.json"
MODEL = "model.safetensors"
CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
MANIFEST_FORMAT = "graft-run-checkpoint"
NAME = re.compile(r"^epoch_(\d{6,})(?:_step_(\d{6,}))?$")
VERIFY = ("sha256", "sizes")
"""What makes a run checkpoint complete for `graft.open(..., verify=)`: "sha256" (the default, the
rule resume uses: manifest, sizes and every file's hash) or "sizes" (manifest and sizes only)."""


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """epoch_000005 (epoch boundary) or epoch_000005_step_000123 (mid-epoch, global step)."""
    return f"epoch_{epoch:06d}" if step is None else f"epoch_{epoch:06d}_step_{step:06d}"


def sort_key(name: str) -> tuple[int, int, int]:
    """Oldest first: epoch_5 < epoch_5_step_N (inside epoch 6) < epoch_6."""
    m = NAME.match(name)
    assert m, name
    return int(m.group(1)), m.group(2) is not None, int(m.group(2) or 0)


def candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run (complete or not), newest first; temp folders excluded."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: sort_key(p.name), reverse=True)


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(folder, "has no manifest.json: the save did not finish",
                              "use an older checkpoint (--resume auto skips this one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(folder, f"manifest.json is not valid JSON ({e})",
                              "the checkpoint is corrupt; use an older one") from e
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(folder, "manifest.json is not a graft run-checkpoint manifest",
                              "point at a folder written by graft's trainer")
    return manifest


def problem(folder: str | Path, hashes: bool = True) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is): manifest, then sizes, then hashes."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except CheckpointError as e:
        return e.problem
    for rel, want in manifest["files"].items():
        f = folder / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, the manifest says {want['size']}"
    if MODEL not in manifest["files"]:
        return f"the manifest lists no {MODEL}"
    if hashes:
        rels = list(manifest["files"])
        # One thread per file, up to the cores: hashlib releases the GIL, and sha256 (about 1 GB/s
        # per core) is slower than a cold sequential read, so files hashed side by side go faster.
        workers = max(1, min(len(rels), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(lambda rel: sha256_file(folder / rel), rels))
        for rel, digest in zip(rels, digests):
            if digest != manifest["files"][rel]["sha256"]:
                return f"{rel} does not match its sha256 in the manifest (corrupt)"
    return None


def newest_complete(run_dir: str | Path, hashes: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest complete checkpoint or None, [(skipped newer folder, why)])."""
    skipped = []
    for folder in candidates(run_dir):
        why = problem(folder, hashes=hashes)
        if why is None:
            return folder, skipped
        skipped.append((folder, why))
    return None, skipped


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file() and (path / MODEL).is_file()


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / CHECKPOINTS).is_dir()


def resolve(path: str | Path, hashes: bool = True) -> tuple[Path, list[tuple[Path, str]]]:
    """The checkpoint folder `path` names (itself, or a run folder's newest complete checkpoint)
    and the newer folders of the run skipped on the way, each with why."""
    path = Path(path)
    if is_run_dir(path) and not (path / MANIFEST).exists():
        folder, skipped = newest_complete(path, hashes=hashes)
        if folder is None:
            detail = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "no checkpoint folders"
            raise CheckpointError(path, f"holds no complete run checkpoint ({detail})",
                                  "train until a checkpoint is saved, or point at a checkpoint file")
        return folder, skipped
    why = problem(path, hashes=hashes)
    if why is not None:
        raise CheckpointError(path, f"is not a complete run checkpoint: {why}",
                              "use an older checkpoint of the run, or the run folder (its newest complete one)")
    return path, []


class GraftRun(Checkpoint):
    """A run checkpoint, checked before use as `--resume auto` checks it (option verify="sha256",
    the default) or by manifest and sizes only (verify="sizes"). A run folder gives its newest
    complete checkpoint, newer broken ones skipped with a warning; a named checkpoint folder that
    fails the check is refused."""

    format = "graft"
    describes = "a graft run checkpoint folder (manifest.json + model.safetensors) or a run folder"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return is_checkpoint_dir(path) or (is_run_dir(path) and bool(candidates(path)))

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        self.verify = (options.extra if options else {}).get("verify", "sha256")
        if self.verify not in VERIFY:
            raise CheckpointError(self.path, f"verify={self.verify!r} is not a run-checkpoint check",
                                  f"use one of {list(VERIFY)}")
        started = time.perf_counter()
        self.folder, self.skipped = resolve(self.path, hashes=self.verify == "sha256")
        self.verify_seconds = time.perf_counter() - started
        for folder, why in self.skipped:
            log.warning("skipping checkpoint %s: %s (as --resume auto does)", folder, why)
        self.manifest = read_manifest(self.folder)
        self._weights = SafetensorsFile(self.folder / MODEL, options)
        self.source = str(self.folder.relative_to(self.path)) if self.folder != self.path else MODEL

    def keys(self) -> list[str]:
        return self._weights.keys()

    def meta(self, key: str) -> TensorMeta:
        return self._weights.meta(key)

    def span(self, key: str) -> Span:
        return self._weights.span(key)

    def info(self) -> dict:
        return {**super().info(), "checkpoint": str(self.folder), "epoch": self.manifest.get("epoch"),
                "step": self.manifest.get("step"), "verified": self.verify,
                "verify_seconds": round(self.verify_seconds, 3),
                "skipped": {p.name: why for p, why in self.skipped}}
