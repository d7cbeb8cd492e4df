"""The sharded save: every rank writes only what it holds, in parallel; rank 0 commits the manifest.

    result = save(run_dir, "epoch_000004", adapter, files={...}, rank_tensors={...}, rank_state={...})

It is two halves, `prepare` (steps 1-2, and everything small captured) and `write` (steps 3-5),
so that the asynchronous save (async_save.py) runs the same writer and commit from a background
thread on a snapshot of the pieces: one owner of the format. On every rank together
(collectives are `group`'s: the default process group's unless one is given):

1. rank 0 opens the temp folder; every rank sends the bytes it holds alone and a digest of its
   replicated holdings (one all_gather_object of small metadata; it also orders the folder's
   creation before any write);
2. the replicated bytes (DDP weights, scalar steps, FSDP2 buffers...) are laid end to end, in
   holdings order, and cut so that every rank's total (own + share) is as close to total / N as
   the cut allows: each rank computes the same cut from the same metadata, so no byte is
   written twice and none is missed;
3. every rank streams its pieces into `shards/rank_<r>.safetensors` (straight from memory,
   hashed while written, fsynced); rank 0 also writes the small JSON/YAML `files`. On S3 the
   shard is streamed into a local staging file and uploaded, every rank at once (atomic.py);
4. every rank sends rank 0 its file's size, hash and pieces (all_gather_object again; a failed
   write travels the same way, so every rank raises the same error and none waits forever);
5. rank 0 checks that the pieces of every logical tensor tile it exactly, writes state.json
   and the manifest (the commit), renames, rotates, and tells every rank the outcome. On S3:
   the records of step 4 arrive only after every rank's upload succeeded, so the manifest is
   put after every other object; a failed upload on any rank is one StorageError on all.

No rank gathers or copies a tensor; a rank's extra memory is the staging buffer for device
tensors (`shard_writer.STAGING_BYTES`) and the metadata (an asynchronous save adds its snapshot).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from graft._logging import get_logger
from graft.checkpointing import faults, layout
from graft.checkpointing.atomic import AtomicCheckpoint, S3Checkpoint, clean_leftovers, open_checkpoint, rotate
from graft.checkpointing.layout import FileEntry, Piece, RunPath, TensorEntry
from graft.checkpointing.shard_writer import STAGING_BYTES
from graft.checkpointing.slices import Holding, StateAdapter, whole
from graft.errors import CheckpointError, GraftError, RunDirError
from graft.storage import as_path
from graft.loading.formats.base import dtype_name

log = get_logger(__name__)


# -- collectives (the default group unless one is given; trivial in one process) ---------

def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj: Any, group=None) -> list:
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(obj: Any, group=None) -> Any:
    """Rank 0's `obj` on every rank (`group` spans every rank, so global rank 0 is its source)."""
    _, world = rank_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# -- splitting replicated bytes ---------------------------------------------------------

def _signature(rep: Sequence[Holding]) -> str:
    h = hashlib.sha256()
    for x in rep:
        h.update(f"{x.name}|{x.shape}|{x.dtype}|{x.start}|{x.stop};".encode())
    return h.hexdigest()


def quotas(own: Sequence[int], replicated: int) -> list[int]:
    """Bytes of the replicated stream each rank writes, so that own + quota is as even as it gets."""
    n = len(own)
    target = (sum(own) + replicated) / n
    want = [max(0.0, target - o) for o in own]
    total = sum(want)
    if total == 0:
        want, total = [1.0] * n, float(n)
    cuts, acc = [], 0.0
    for w in want:
        acc += w
        cuts.append(round(replicated * acc / total))
    cuts[-1] = replicated
    return [b - a for a, b in zip([0, *cuts[:-1]], cuts)]


def share(rep: Sequence[Holding], quota: Sequence[int], rank: int) -> list[Holding]:
    """This rank's part of the replicated holdings: bytes [a, b) of their concatenation, cut at
    element boundaries. An element belongs to the rank whose byte range holds its first byte, so
    every rank computes the same partition."""
    a = sum(quota[:rank])
    b = a + quota[rank]
    out, at = [], 0
    for h in rep:
        size = h.dtype.itemsize
        first = min(h.numel, max(0, -(-(a - at) // size)))
        last = min(h.numel, max(0, -(-(b - at) // size)))
        if last > first:
            out.append(h.narrow(h.start + first, h.start + last))
        at += h.nbytes
    return out


# -- the save ---------------------------------------------------------------------------

@dataclass
class SaveResult:
    folder: RunPath
    bytes_per_rank: list[int]
    seconds: float
    """Start to commit; for a save still in the background: the time training was blocked."""
    deleted: list[str] = field(default_factory=list)
    background: bool = False
    """True while the files are still being written (asynchronous save: not committed yet)."""


@dataclass
class Prepared:
    """One rank's part of checkpoint `name`, agreed by every rank (`prepare`), and everything small
    captured at that moment, so `write` may run later, from another thread, and save this moment."""

    run_dir: RunPath
    atomic: AtomicCheckpoint | S3Checkpoint
    rank: int
    world: int
    pieces: list[Holding]
    """What this rank writes: its own holdings, then its share of the replicated bytes (views)."""
    tensors: dict[str, tuple[list[int], str]]
    """Every logical tensor this rank holds any of: name -> (shape, dtype name)."""
    state: dict
    """This rank's JSON state (state.json "ranks"), a copy."""
    files: dict[str, bytes]
    """Rank 0: the small files, serialised."""
    adapter_state: dict | None
    """Rank 0: `adapter.extra_state()` (state.json "adapter"), a copy."""
    kind: str
    bytes_per_rank: list[int]
    """Tensor bytes each rank writes (own + share of the replicated)."""
    started: float

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.pieces)


def _failure(e: BaseException, rank: int) -> dict:
    """A failure as plain data (crosses ranks in an all_gather, unlike some exceptions)."""
    if isinstance(e, OSError):
        return {**faults.describe_failure(e, rank), "type": type(e).__name__}
    out = {"rank": rank, "type": type(e).__name__, "errno": None, "strerror": str(e), "filename": None}
    if isinstance(e, (RunDirError, CheckpointError)):
        # graft.storage's refusals (an upload or a read of S3 failed), worded where they happened.
        out["graft"] = {"path": e.path, "problem": e.problem, "way_out": e.way_out}
    return out


def _agreed(run_dir: RunPath, atomic: AtomicCheckpoint | S3Checkpoint, failure: dict, own: BaseException | None,
            rank: int, group=None) -> BaseException:
    """The error every rank raises when any rank failed (every rank is here): rank 0 removes the
    temp folder (on S3: the objects this save uploaded) and words it; a fault the user can fix (disk
    full, read-only, S3 refusing or unreachable...) is the same one-line `graft.StorageError` on every
    rank, anything else stays each rank's own exception."""
    mine = None
    if rank == 0:
        if failure.get("graft") is not None:
            atomic.abandon()  # first: the message names the newest complete checkpoint left
            mine = faults.upload_failed(run_dir, atomic.name, failure)
        else:
            if failure["errno"] is not None and not atomic.remote:
                mine = faults.save_failed(run_dir, atomic.tmp, failure, remove=True,
                                          own=own if isinstance(own, OSError) else None)
            atomic.abandon()
    shared = broadcast(mine if isinstance(mine, GraftError) else None, group)
    if shared is not None:
        return mine if rank == 0 else shared
    if own is not None:
        return own
    if failure["errno"] is not None:
        return OSError(failure["errno"], f"rank {failure['rank']} could not write the checkpoint: "
                                         f"{failure['strerror']}", failure["filename"])
    return RuntimeError(f"rank {failure['rank']} failed to write its part of the checkpoint: "
                        f"{failure['type']}: {failure['strerror']}")


def _copy_json(obj: Any) -> Any:
    """A deep copy through JSON (what state.json will hold anyway): live lists of a scheduler or
    param group may change after the save point, this may not."""
    return json.loads(json.dumps(obj))


def save(run_dir: str | Path, name: str, adapter: StateAdapter, *, files: dict[str, Any] | None = None,
         rank_tensors: dict[str, torch.Tensor] | None = None, rank_state: dict | None = None,
         info: dict | None = None, keep_last: int | None = None, staging_bytes: int = STAGING_BYTES,
         group=None) -> SaveResult:
    """Write checkpoint `name` of `run_dir` from every rank at once; returns on every rank after the commit.

    files: rank 0 only; relative name -> JSON-able object (written as JSON) or bytes (as is).
    rank_tensors: this rank's private tensors (RNG states...), by logical name (`layout.rank_name`).
    rank_state: this rank's JSON-able private state (RNG metadata, counters); state.json keeps
    every rank's under "ranks", and rank 0's `adapter.extra_state()` under "adapter".
    """
    prepared = prepare(run_dir, name, adapter, files=files, rank_tensors=rank_tensors, rank_state=rank_state,
                       group=group)
    return write(prepared, info=info, keep_last=keep_last, staging_bytes=staging_bytes, group=group)


def prepare(run_dir: str | Path, name: str, adapter: StateAdapter, *, files: dict[str, Any] | None = None,
            rank_tensors: dict[str, torch.Tensor] | None = None, rank_state: dict | None = None,
            group=None, guard=None) -> Prepared:
    """Steps 1-2 on every rank: open the temp folder, agree who writes which bytes; capture the
    small state (copies). The pieces stay views of live memory. `guard`: rank 0 calls it first; an
    error it raises (a run folder lock lost) fails the save on every rank."""
    started = time.perf_counter()
    rank, world = rank_world()
    run_dir = as_path(run_dir)
    atomic = open_checkpoint(run_dir, name)
    holdings = adapter.holdings()
    own = [h for h in holdings if not h.replicated]
    own += [whole(k, t, replicated=False) for k, t in (rank_tensors or {}).items()]
    rep = [h for h in holdings if h.replicated]
    rank_state = dict(rank_state or {})
    if hasattr(adapter, "rank_state"):  # optional: an adapter's rank-private JSON state
        rank_state["adapter"] = adapter.rank_state()
    began = None
    if rank == 0:
        try:
            if guard is not None:
                guard()
            atomic.begin()
        except (OSError, GraftError) as e:  # every rank waits below: it must hear of this
            began = _failure(e, 0)
    meta = all_gather((sum(h.nbytes for h in own), _signature(rep), began), group)
    if meta[0][2] is not None:
        raise _agreed(run_dir, atomic, meta[0][2], None, rank, group)
    if len({m[1] for m in meta}) != 1:
        raise RuntimeError("the ranks hold different replicated tensors (names, shapes or dtypes differ): "
                           "every rank must build the same model and optimizer")
    quota = quotas([m[0] for m in meta], sum(h.nbytes for h in rep))
    mine = [h for h in own if h.numel] + share(rep, quota, rank)
    serialised = {rel: obj if isinstance(obj, bytes) else json.dumps(obj, indent=1).encode()
                  for rel, obj in (files or {}).items()} if rank == 0 else {}
    return Prepared(
        run_dir=run_dir, atomic=atomic, rank=rank, world=world, pieces=mine,
        tensors={h.name: (list(h.shape), dtype_name(h.dtype)) for h in [*holdings, *own]},
        state=_copy_json(rank_state), files=serialised,
        adapter_state=_copy_json(adapter.extra_state()) if rank == 0 else None, kind=adapter.kind,
        bytes_per_rank=[m[0] + q for m, q in zip(meta, quota)], started=started)


def write(p: Prepared, *, info: dict | None = None, keep_last: int | None = None,
          staging_bytes: int = STAGING_BYTES, group=None, data: Sequence[torch.Tensor] | None = None) -> SaveResult:
    """Steps 3-5 on every rank: write this rank's shard (from `data`, a snapshot of `p.pieces` in
    the same order, or from the live views), gather the records, commit on rank 0, agree."""
    rank = p.rank
    shard = layout.shard_file(rank)
    record, error, err_obj = None, None, None
    try:
        sources = [h.local for h in p.pieces] if data is None else data
        items = [(layout.piece_key(h.name, h.start, h.stop), t) for h, t in zip(p.pieces, sources, strict=True)]
        extra = {rel: p.atomic.write_file(rel, raw) for rel, raw in p.files.items()}
        written, etag = p.atomic.write_shard(shard, items, {"format": "graft-shard", "rank": rank}, staging_bytes)
        record = {
            "file": shard, "size": written.size, "hash": written.hash, "algo": written.algo, "etag": etag,
            "pieces": [(h.name, written.offsets[k], h.start, h.stop) for (k, _), h in zip(items, p.pieces)],
            "tensors": p.tensors,
            "extra": {rel: (w.size, w.hash, w.algo, tag) for rel, (w, tag) in extra.items()},
            "state": p.state,
        }
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, then it is re-raised
        error, err_obj = _failure(e, rank), e
    # Every rank learns whether any rank failed to write, so all stop with the same error
    # (instead of the others waiting for a rank that is gone).
    records = all_gather(record if error is None else {"failed": error}, group)
    failed = [r["failed"] for r in records if "failed" in r]
    if failed:
        raise _agreed(p.run_dir, p.atomic, failed[0], err_obj, rank, group)

    outcome: Any = None
    if rank == 0:
        try:
            outcome = _commit(p, records, info or {}, keep_last)
        except Exception as e:  # noqa: BLE001 - every rank hears of it below
            outcome = {"failed": _failure(e, 0)}
            err_obj = e
    outcome = broadcast(outcome, group)
    if isinstance(outcome, dict) and "failed" in outcome:
        raise _agreed(p.run_dir, p.atomic, outcome["failed"], err_obj, rank, group)
    sizes = [r["size"] + sum(e[0] for e in r["extra"].values()) for r in records]
    return SaveResult(p.atomic.final, sizes, time.perf_counter() - p.started, outcome or [])


def _commit(p: Prepared, records: list[dict], info: dict, keep_last: int | None) -> list[str]:
    atomic, world = p.atomic, p.world
    tensors: dict[str, TensorEntry] = {}
    for r in records:
        for tname, (shape, dtype) in r["tensors"].items():
            entry = tensors.setdefault(tname, TensorEntry(tuple(shape), layout.parse_dtype(dtype)))
            if entry.shape != tuple(shape) or dtype_name(entry.dtype) != dtype:
                raise RuntimeError(f"{tname}: the ranks disagree on its shape or dtype ({entry.shape} "
                                   f"{entry.dtype} vs {tuple(shape)} {dtype})")
    for r in records:
        for tname, offset, start, stop in r["pieces"]:
            tensors[tname].pieces.append(Piece(r["file"], offset, start, stop))
    for tname, entry in tensors.items():
        entry.pieces.sort(key=lambda p: p.start)
        why = entry.gaps()
        if why is not None:  # an adapter bug: never commit a checkpoint that cannot be restored
            raise RuntimeError(f"{tname}: the saved pieces do not cover it exactly: {why}")
    state = {"adapter": p.adapter_state, "ranks": [r["state"] for r in records]}
    state_file, state_etag = atomic.write_file(layout.STATE, json.dumps(state, indent=1).encode())
    files = {r["file"]: FileEntry(r["size"], r["hash"], r["algo"], rank, r["etag"]) for rank, r in enumerate(records)}
    for rel, (size, digest, algo, etag) in records[0]["extra"].items():
        files[rel] = FileEntry(size, digest, algo, etag=etag)
    files[layout.STATE] = FileEntry(state_file.size, state_file.hash, state_file.algo, etag=state_etag)
    manifest = layout.manifest_json(files, tensors, world_size=world, strategy=p.kind, info=info)
    final = atomic.commit(manifest)
    if atomic.remote:
        try:
            deleted = rotate(atomic.root.parent, keep_last, final)
        except GraftError as e:
            # The checkpoint is committed: a refused delete must not fail the save (which would
            # tell every rank it was lost). The old folders stay complete; the next rotation
            # deletes them (it takes every complete one beyond keep_last).
            log.warning("keep_last=%s: could not delete older checkpoints of %s (%s); the next save retries",
                        keep_last, atomic.root, e)
            deleted = []
    else:
        deleted = rotate(atomic.root.parent, keep_last, final)
    total = sum(f.size for f in files.values())
    log.info("saved %s (%.1f MB from %d rank(s))", final, total / 1e6, world)
    return deleted


__all__ = ["Prepared", "SaveResult", "all_gather", "broadcast", "clean_leftovers", "prepare", "quotas", "save",
           "share", "write"]
