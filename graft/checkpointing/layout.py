"""The run-checkpoint format, in one place: folder and file names, the manifest, and "complete".

    RUN_DIR/checkpoints/epoch_000005/                 5 epochs done
    RUN_DIR/checkpoints/epoch_000005_step_000123/     mid-epoch (preemption), global step 123
    RUN_DIR/checkpoints/.tmp-epoch_000006/            a save in progress (never read)
    RUN_DIR/checkpoints/.trash-epoch_000002/          a rotation or replacement in progress

A checkpoint folder (manifest version 2):

    shards/rank_00000.safetensors   what rank 0 held: its pieces of the logical tensors
    shards/rank_00001.safetensors   ... one file per rank of the run that saved
    state.json                      the non-tensor state: optimizer param_groups by parameter
                                    names, per-rank RNG and counters, the adapter's extra state
    scheduler.json, train_state.json, config.yaml
    manifest.json                   written LAST: the commit point

The manifest maps every LOGICAL tensor (`model/<fqn>`, `optim/<fqn>/<state>`, `rank/<rank>/<k>`)
to its global shape and dtype and the pieces that hold it: each piece a flat element range
[start, stop) of the row-major flattened tensor, at a byte offset of one shard file. It also
lists every file with its size and hash (BLAKE3; see `HASH`). A checkpoint is complete when its
manifest parses and every file it lists is there with its size (and hash, when checked), and
every rank of the saving run has its shard file listed. Nothing else is trusted.

Version 1 (before sharded saves: one gathered `model.safetensors`, sha256 hashes) is still
read by `graft.open`; the trainer resumes only version 2.

A run folder may also be an s3:// prefix (`graft.storage.S3Path`): every function here takes
either. Object stores have no rename, so there the folders are written under their final names
and the manifest object, uploaded last, is the commit; "complete" is decided the same way.
Hashes on S3: see `problem`.

This module imports nothing of graft but the errors and `graft.storage` (itself light: its
client library is imported on first use), so the loading core (graft.open's reader), the
trainer and the launcher can all import it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graft.errors import CheckpointError
from graft.loading.formats import json_file
from graft.storage import S3Path, as_path, open_file
from graft.loading.formats.base import dtype_name

# -- folders of a run ------------------------------------------------------------------
CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
NAME = re.compile(r"^epoch_(\d{6,})(?:_step_(\d{6,}))?$")
RUN_CONFIG = "config.yaml"
"""The run folder's resolved config (each checkpoint also keeps its own copy, CONFIG)."""

# -- files of a checkpoint -------------------------------------------------------------
MANIFEST = "manifest.json"
SHARDS = "shards"
STATE = "state.json"
SCHEDULE = "scheduler.json"
TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
LEGACY_MODEL = "model.safetensors"
"""Version 1: the gathered weights, one file."""

# -- the manifest ----------------------------------------------------------------------
MANIFEST_FORMAT = "graft-run-checkpoint"
MANIFEST_VERSION = 2
LEGACY_VERSION = 1
HASH = "blake3"
MANIFEST_MAX_BYTES = 1 << 30
"""A manifest lists every piece of every tensor: thousands of ranks x thousands of tensors fit."""
"""The hash new manifests record. Measured here: sha256 0.8-0.9 GB/s on one core, about the
speed of write + fsync, so hashing while writing would have doubled a save's time on a busy
core; BLAKE3 hashes 3.2 GB/s on one core. Version-1 manifests (sha256) stay readable."""

# -- logical tensor names --------------------------------------------------------------
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
RANK_PREFIX = "rank/"
"""Tensors private to one rank of the saving run (its RNG states...): restored only at the same
world size."""


def shard_file(rank: int) -> str:
    """The shard file of `rank`, relative to the checkpoint folder."""
    return f"{SHARDS}/rank_{rank:05d}.safetensors"


def model_name(fqn: str) -> str:
    return MODEL_PREFIX + fqn


def optim_name(fqn: str, state_key: str) -> str:
    return f"{OPTIM_PREFIX}{fqn}/{state_key}"


def rank_name(rank: int, key: str) -> str:
    """`rank/<rank>/<key>`: a tensor of rank `rank` alone (RNG states, engine-private state)."""
    return f"{RANK_PREFIX}{rank:05d}/{key}"


def rank_prefix(rank: int) -> str:
    return rank_name(rank, "")


def split_optim_name(name: str) -> tuple[str, str]:
    """`optim/<fqn>/<state>` -> (fqn, state)."""
    fqn, _, key = name[len(OPTIM_PREFIX):].rpartition("/")
    return fqn, key


def piece_key(name: str, start: int, stop: int) -> str:
    """The key of one piece inside a shard file (unique even if a rank held two ranges)."""
    return f"{name}[{start}:{stop}]"


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# -- names of checkpoint folders -------------------------------------------------------

def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """epoch_000005 (epoch boundary) or epoch_000005_step_000123 (mid-epoch, global step)."""
    return f"epoch_{epoch:06d}" if step is None else f"epoch_{epoch:06d}_step_{step:06d}"


def sort_key(name: str) -> tuple[int, int, int]:
    """Oldest first: epoch_5 < epoch_5_step_N (inside epoch 6) < epoch_6."""
    m = NAME.match(name)
    assert m, name
    return int(m.group(1)), m.group(2) is not None, int(m.group(2) or 0)


RunPath = Path | S3Path
"""A run or checkpoint folder: local, or an s3:// prefix."""


def candidates(run_dir: str | RunPath) -> list[RunPath]:
    """Checkpoint folders of a run (complete or not), newest first; temp and trash folders excluded.
    On S3 the listing is the cached one (`S3Path.refresh()` first for a fresh one)."""
    root = as_path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: sort_key(p.name), reverse=True)


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / CHECKPOINTS).is_dir()


# -- hashes ----------------------------------------------------------------------------

def new_hasher(algo: str = HASH):
    if algo == "blake3":
        import blake3

        return blake3.blake3()
    return hashlib.new(algo)


def hash_file(path: str | RunPath, algo: str = HASH, chunk: int = 8 << 20) -> str:
    """The hash of a whole file (an s3:// object is downloaded for it: `problem` avoids that)."""
    h = new_hasher(algo)
    with open_file(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- the manifest ----------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of a flattened logical tensor, stored raw at byte `offset` of `file`."""

    file: str
    offset: int
    start: int
    stop: int


@dataclass
class TensorEntry:
    """One logical tensor: global shape, dtype, and the pieces that cover it (sorted by start)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[Piece] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def gaps(self) -> str | None:
        """Why the pieces do not tile [0, numel) exactly once (None when they do)."""
        at = 0
        for p in sorted(self.pieces, key=lambda p: p.start):
            if p.start != at or p.stop <= p.start:
                return f"piece [{p.start}, {p.stop}) where element {at} was expected"
            at = p.stop
        return None if at == self.numel else f"pieces end at element {at} of {self.numel}"


@dataclass
class FileEntry:
    size: int
    hash: str
    algo: str
    rank: int | None = None
    etag: str | None = None
    """The object's ETag when it was saved to S3 (None on disk): the check `problem` makes there."""


def same_etag(a: str | None, b: str | None) -> bool:
    """ETags compared without their quotes (S3 quotes them; some clients strip them)."""
    return a is not None and b is not None and a.strip('"') == b.strip('"')


@dataclass
class Manifest:
    """The parsed manifest.json of one checkpoint (either version)."""

    folder: RunPath
    version: int
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    world_size: int | None
    strategy: str | None
    info: dict[str, Any]

    def layout(self) -> dict:
        """A summary for `graft inspect` and reports: how the state is cut up."""
        if self.version == LEGACY_VERSION:
            return {"kind": "gathered", "files": sorted(self.files)}
        shards = sorted(f for f in self.files if f.startswith(SHARDS + "/"))
        per_rank = {f: e.size for f, e in self.files.items() if f in shards}
        groups: dict[str, int] = {}
        for name in self.tensors:
            head = name.split("/", 1)[0]
            groups[head] = groups.get(head, 0) + 1
        return {"kind": "sharded", "shard_files": len(shards), "bytes_per_shard": per_rank,
                "pieces": sum(len(t.pieces) for t in self.tensors.values()), "logical_tensors": groups}


def _bad(folder: Path, problem: str) -> CheckpointError:
    return CheckpointError(folder / MANIFEST, problem, "the checkpoint is corrupt; use an older one")


def parse_manifest(folder: Path, raw: dict) -> Manifest:
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT or not isinstance(raw.get("files"), dict):
        raise CheckpointError(folder, f"{MANIFEST} is not a graft run-checkpoint manifest",
                              "point at a folder written by graft's trainer")
    version = raw.get("version", LEGACY_VERSION)
    if version not in (LEGACY_VERSION, MANIFEST_VERSION):
        raise CheckpointError(folder, f"{MANIFEST} has version {version!r}; this graft reads versions "
                                      f"{LEGACY_VERSION} and {MANIFEST_VERSION}", "upgrade torch-graft")
    try:
        files = {}
        for rel, e in raw["files"].items():
            algo = "sha256" if "sha256" in e else e["algo"]
            etag = e.get("etag")
            files[rel] = FileEntry(int(e["size"]), str(e["sha256"] if algo == "sha256" else e["hash"]), algo,
                                   e.get("rank"), str(etag) if etag is not None else None)
        tensors = {}
        for name, t in (raw.get("tensors") or {}).items():
            tensors[name] = TensorEntry(tuple(int(s) for s in t["shape"]), parse_dtype(t["dtype"]),
                                        [Piece(str(p[0]), int(p[1]), int(p[2]), int(p[3])) for p in t["pieces"]])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise _bad(folder, f"malformed entry ({type(e).__name__}: {e})") from e
    info = {k: v for k, v in raw.items() if k not in ("format", "version", "files", "tensors")}
    return Manifest(folder, version, files, tensors, raw.get("world_size"), raw.get("strategy"), info)


def manifest_json(files: dict[str, FileEntry], tensors: dict[str, TensorEntry], *, world_size: int,
                  strategy: str, info: dict) -> dict:
    """The manifest (version 2) as JSON. Pieces are [file, offset, start, stop] lists: a model has
    thousands, and the manifest is read on every resume."""
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "world_size": world_size, "strategy": strategy,
        **info,
        "files": {rel: {"size": e.size, "algo": e.algo, "hash": e.hash, "rank": e.rank,
                        **({"etag": e.etag} if e.etag is not None else {})} for rel, e in files.items()},
        "tensors": {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
                           "pieces": [[p.file, p.offset, p.start, p.stop] for p in t.pieces]}
                    for name, t in tensors.items()},
    }


def read_manifest(folder: str | RunPath) -> Manifest:
    folder = as_path(folder)
    if isinstance(folder, S3Path) and not (folder / MANIFEST).is_file():
        # A missing object is a CheckpointError of graft.storage ("no such object"), not a
        # FileNotFoundError: say what it means here (the listing is cached, so no extra request).
        raise CheckpointError(folder, f"has no {MANIFEST}: the save did not finish",
                              "use an older checkpoint (--resume auto skips this one)")
    try:
        # The bounded parser (no NaN, duplicate keys, deep nesting...): the manifest is the root of
        # every check, so it is read as untrusted as any checkpoint file.
        raw = json_file.read(folder / MANIFEST, MANIFEST, max_bytes=MANIFEST_MAX_BYTES)
    except FileNotFoundError:
        raise CheckpointError(folder, f"has no {MANIFEST}: the save did not finish",
                              "use an older checkpoint (--resume auto skips this one)") from None
    except OSError as e:
        raise CheckpointError(folder / MANIFEST, f"cannot be read ({e.strerror or e})",
                              "check the folder's permissions and storage, or use an older checkpoint") from e
    return parse_manifest(folder, raw)


# -- completeness ----------------------------------------------------------------------

def problem(folder: str | RunPath, hashes: bool = True) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is): manifest, files, sizes, hashes.

    On S3, `hashes` checks each object's ETag against the one the save recorded, not the
    content hash: hashing means downloading every byte of the checkpoint on the rank that
    picks it, while a resume reads only each rank's own ranges (1/N of it per rank). The
    ETag, which the LIST that finds the files returns anyway, is the server's fingerprint of
    the object as uploaded: it changes when an object is replaced or re-uploaded after the
    commit (a second writer, a partial copy), which is what a disk's hash catches there that
    sizes do not; bit rot inside the store is the store's own checksums' job. The BLAKE3
    hashes stay in the manifest: `hash_file` verifies a downloaded copy.
    """
    folder = as_path(folder)
    remote = isinstance(folder, S3Path)
    try:
        m = read_manifest(folder)
    except CheckpointError as e:
        return e.problem
    for rel, want in m.files.items():
        f = folder / rel
        if not f.is_file():
            return f"{rel} is missing"
        stat = f.stat()
        if stat.st_size != want.size:
            return f"{rel} has {stat.st_size} bytes, the manifest says {want.size}"
        if remote and hashes and want.etag is not None and not same_etag(stat.etag, want.etag):
            return f"{rel} was replaced after the save (ETag {stat.etag}, the manifest says {want.etag})"
    if m.version == LEGACY_VERSION:
        if LEGACY_MODEL not in m.files:
            return f"the manifest lists no {LEGACY_MODEL}"
    else:
        if not isinstance(m.world_size, int) or m.world_size < 1:
            return "the manifest names no world size"
        missing = [shard_file(r) for r in range(m.world_size) if shard_file(r) not in m.files]
        if missing:
            return f"the manifest lists no {missing[0]} (a rank's shard)"
        for name, t in m.tensors.items():
            unlisted = {p.file for p in t.pieces} - set(m.files)
            if unlisted:
                return f"{name} has pieces in {sorted(unlisted)[0]}, which the manifest does not list"
    if hashes and not remote:
        rels = list(m.files)
        # Files hashed side by side: the hashers release the GIL, and a hash of one core is
        # slower than a cold sequential read.
        workers = max(1, min(len(rels), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(lambda rel: hash_file(folder / rel, m.files[rel].algo), rels))
        for rel, digest in zip(rels, digests):
            if digest != m.files[rel].hash:
                return f"{rel} does not match its {m.files[rel].algo} in the manifest (corrupt)"
    return None


def newest_complete(run_dir: str | RunPath, hashes: bool = True) -> tuple[RunPath | None, list[tuple[RunPath, str]]]:
    """(newest complete checkpoint or None, [(skipped newer folder, why)]). On S3 from a fresh
    listing: what graft.storage keeps of the bucket may predate another writer's changes."""
    run_dir = as_path(run_dir)
    if isinstance(run_dir, S3Path):
        run_dir.refresh()
    skipped = []
    for folder in candidates(run_dir):
        why = problem(folder, hashes=hashes)
        if why is None:
            return folder, skipped
        skipped.append((folder, why))
    return None, skipped


def resolve(path: str | RunPath, hashes: bool = True) -> tuple[RunPath, list[tuple[RunPath, str]]]:
    """The checkpoint folder `path` names (itself, or a run folder's newest complete checkpoint)
    and the newer folders of the run skipped on the way, each with why."""
    path = as_path(path)
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
