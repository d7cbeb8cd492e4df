"""Run checkpoints: atomic folders with a manifest written last, rotation, and resume discovery.

A save, on every rank together:

1. rank 0 makes `checkpoints/.tmp-<name>/` (removing a leftover of the same name);
2. every rank writes its own files there (sharded optimizer state, under ZeRO), rank 0 the
   shared ones; each file is fsynced before it is closed;
3. rank 0 hashes every file into manifest.json, fsyncs it, renames the folder to `<name>`
   and fsyncs `checkpoints/`; only then is the checkpoint visible as complete;
4. rank 0 rotates: with `keep_last`, the oldest complete checkpoints beyond the newest
   `keep_last` are moved to `.trash-*` (atomic) and deleted. Rotation runs after the commit,
   so the previous checkpoint is never deleted before its successor is safe on disk.

A kill at any point leaves either the previous state plus a `.tmp-*` folder (removed by
the next resume) or the new complete checkpoint. Nothing is pickled: tensors go to
safetensors files, everything else to JSON, through `encode`/`decode` below.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from graft._logging import get_logger
from graft.errors import CheckpointError
from graft.loading.formats.graft_run import (
    CHECKPOINTS,
    MANIFEST,
    MANIFEST_FORMAT,
    TMP_PREFIX,
    TRASH_PREFIX,
    candidates,
    checkpoint_name,  # re-exported: the trainer names folders through this module
    newest_complete,
    problem,
    sha256_file,
    sort_key,
)

log = get_logger(__name__)

# File names inside a checkpoint folder (one definition, used by save and load).
MODEL = "model.safetensors"
OPTIM_TENSORS, OPTIM_META = "optimizer.safetensors", "optimizer.json"
OPTIM_SHARD = "optimizer/rank_{rank:05d}"  # + .safetensors / .json (sharded layouts)
SCHEDULE = "scheduler.json"
RNG_TENSORS, RNG_META = "rng.safetensors", "rng.json"
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"

# Classes `decode` may rebuild from JSON (by setting their attributes; no code runs).
# DeepSpeed keeps a loss scaler object and small dataclasses in its optimizer state.
_REBUILDABLE_PREFIXES = ("deepspeed.",)


# -- durable writes --------------------------------------------------------------------

def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        e.filename = e.filename or str(path)  # write/fsync errors (ENOSPC) name no file: say which
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=False).encode())


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save as st_save

    # Clones: safetensors refuses tensors that share memory (tied weights, views of one
    # flat buffer), and the bytes must not change while they are written.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    write_bytes(path, st_save(clean, metadata=metadata))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


# -- JSON + tensors codec (no pickle) --------------------------------------------------

def encode(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`obj` as JSON; its tensors moved into `tensors` under their path, replaced by references."""
    if isinstance(obj, torch.Tensor):
        key = path or "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, enum.Enum):
        return {"__enum__": f"{type(obj).__module__}:{type(obj).__qualname__}", "value": obj.value}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v, tensors, f"{path}/{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{path}/k{i}"), encode(v, tensors, f"{path}/{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    cls = type(obj)
    qual = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__.startswith(_REBUILDABLE_PREFIXES):
        fields = ({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj)
                  else vars(obj))
        return {"__object__": qual, "state": encode(fields, tensors, f"{path}/state")}
    raise TypeError(f"cannot store {qual} at {path!r} without pickle; add a conversion in graft.trainer.checkpoint")


def _import(qual: str):
    module, _, name = qual.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__enum__" in obj:
        return _import(obj["__enum__"])(obj["value"])
    if "__object__" in obj:
        qual = obj["__object__"]
        if not qual.startswith(_REBUILDABLE_PREFIXES):
            raise CheckpointError(qual, "this class may not be rebuilt from a checkpoint",
                                  "only DeepSpeed state objects are rebuilt")
        cls = _import(qual)
        inst = cls.__new__(cls)
        inst.__dict__.update(decode(obj["state"], tensors))
        return inst
    return {k: decode(v, tensors) for k, v in obj.items()}


def save_tree(folder: Path, stem: str, tree: Any) -> None:
    """`tree` as `stem`.safetensors (its tensors) + `stem`.json (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = encode(tree, tensors)
    write_safetensors(folder / f"{stem}.safetensors", tensors)
    write_json(folder / f"{stem}.json", meta)


def load_tree(folder: Path, stem: str) -> Any:
    tensors = read_safetensors(folder / f"{stem}.safetensors")
    return decode(json.loads((folder / f"{stem}.json").read_text()), tensors)


# -- the atomic folder -----------------------------------------------------------------

def _noop():
    pass


class AtomicCheckpoint:
    """One checkpoint being written by every rank; visible only after `commit`."""

    def __init__(self, run_dir: str | Path, name: str, *, is_main: bool, barrier: Callable[[], None] = _noop):
        self.root = Path(run_dir) / CHECKPOINTS
        self.name = name
        self.tmp = self.root / f"{TMP_PREFIX}{name}"
        self.final = self.root / name
        self.is_main = is_main
        self.barrier = barrier
        self.started = time.perf_counter()

    def begin(self) -> Path:
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        self.barrier()
        return self.tmp

    def commit(self, info: dict) -> Path:
        """Manifest last, rename, fsync the parent; returns the final path (on every rank)."""
        self.barrier()  # every rank's files are written and fsynced
        if self.is_main:
            files = {}
            for f in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
                rel = f.relative_to(self.tmp).as_posix()
                files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for sub in {self.tmp, *(p for p in self.tmp.rglob("*") if p.is_dir())}:
                fsync_dir(sub)
            write_json(self.tmp / MANIFEST, {"format": MANIFEST_FORMAT, "version": 1, **info, "files": files,
                                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            fsync_dir(self.tmp)
            if self.final.exists():
                # A folder of the same name (a run resumed from an older checkpoint passes
                # this point again): swap it out atomically, then delete it.
                trash = self.root / f"{TRASH_PREFIX}{self.name}"
                if trash.exists():
                    shutil.rmtree(trash)
                os.rename(self.final, trash)
                try:
                    os.rename(self.tmp, self.final)
                except OSError:
                    os.rename(trash, self.final)  # a failed swap puts the complete one back
                    raise
                fsync_dir(self.root)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, self.final)
                fsync_dir(self.root)
            size = sum(v["size"] for v in files.values())
            log.info("saved %s (%.1f MB) in %.2fs", self.final, size / 1e6, time.perf_counter() - self.started)
        self.barrier()
        return self.final


def rotate(run_dir: str | Path, keep_last: int | None, newest: Path) -> list[str]:
    """Delete complete checkpoints older than the newest `keep_last`; never `newest`. Returns deleted names."""
    if keep_last is None:
        return []
    complete = [p for p in candidates(run_dir) if (p / MANIFEST).is_file()]  # newest first
    keep = set(complete[:keep_last]) | {newest}
    deleted = []
    for p in complete[keep_last:]:
        if p in keep or sort_key(p.name) >= sort_key(newest.name):
            continue
        trash = p.parent / f"{TRASH_PREFIX}{p.name}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(p.name)
    return deleted


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Remove `.tmp-*` and `.trash-*` folders of interrupted saves and rotations; returns their names."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def find_resume(run_dir: str | Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest complete checkpoint (hashes checked) and the newer ones skipped; raises if none."""
    folder, skipped = newest_complete(run_dir, hashes=True)
    if folder is None:
        detail = "; ".join(f"{p.name}: {why}" for p, why in skipped) or "no checkpoint folders"
        raise CheckpointError(Path(run_dir) / CHECKPOINTS,
                              f"holds no complete checkpoint to resume from ({detail})",
                              "start the run without --resume (a fresh run), or pass --resume PATH")
    return folder, skipped


def check_complete(folder: str | Path) -> Path:
    """`folder` if it is a complete checkpoint (hashes checked), else a CheckpointError saying why."""
    folder = Path(folder)
    why = problem(folder, hashes=True)
    if why is not None:
        raise CheckpointError(folder, f"is not a complete checkpoint: {why}",
                              "resume from an older checkpoint, or use --resume auto")
    return folder
