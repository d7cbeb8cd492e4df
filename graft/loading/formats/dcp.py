"""torch.distributed.checkpoint folders: a `.metadata` file and `__<rank>_<n>.distcp` files.

Names, shapes and dtypes come from `.metadata` alone. Each tensor is stored as one or more
chunks (one per rank under FSDP), each chunk a small `torch.save` record at (file, offset,
length). The chunks are checked against the tensor's shape on open (inside it, tiling it
exactly, each record long enough), so a lying `.metadata` fails before anything is
allocated. We read no record whole: the record's zip structure (`torch_zip.Archive`) gives
the byte range of its values, and those bytes are pread straight into the destination's
region of the tensor. No process group is needed, and only the planned tensors are read.

`.metadata` is a pickle. It is unpickled with an allowlist of DCP's own metadata classes
(no code from the file runs); `trust_pickle=True` lifts that for files you trust.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from graft.errors import CheckpointError
from graft.loading.formats.base import MODEL_CONTAINERS, Checkpoint, OpenOptions, TensorMeta
from graft.loading.formats.reading import Piece, Span, check_spans_fit, file_sizes, read_spans
from graft.loading.formats.torch_zip import Archive, check_view, read_tensor, span_of
from graft.storage import as_path, open_file

METADATA = ".metadata"
# Top-level groups that training code saves beside the model; never offered as model keys.
# ("state"/"param_groups": an optimizer state dict flattened at the top level.)
NON_MODEL_GROUPS = frozenset({
    "optimizer", "optimizers", "optim", "optim_state", "optimizer_state", "state", "param_groups",
    "lr_scheduler", "lr_schedulers", "scheduler", "schedulers", "train_state", "trainer",
    "dataloader", "data_loader", "rng", "rng_state", "rng_states", "extra", "extra_state",
})
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")
_STEP_IN_NAME = re.compile(r"(?:step|global_step|checkpoint|ckpt|iter)[-_]?(\d+)$")
_STEP_KEYS = ("train_state.step", "step", "trainer.step")

# What a DCP `.metadata` pickle may name: DCP's metadata dataclasses, torch.Size, dtypes,
# layouts and a path. Anything else is refused before it can run.
_SAFE_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "torch._utils": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _BlockedGlobal(pickle.UnpicklingError):
    """A global outside the allowlist: a question of trust, not of damage."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise _BlockedGlobal(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata(folder: Path, trust_pickle: bool = False):
    """The folder's `torch.distributed.checkpoint.metadata.Metadata`, unpickled safely."""
    # Imported here: the DCP classes must exist for the unpickler to rebuild them, and
    # graft.loading must stay importable without pulling in torch.distributed.checkpoint.
    import torch.distributed.checkpoint.filesystem  # noqa: F401
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / METADATA
    if not path.is_file():
        raise CheckpointError(folder, "has no .metadata file, so it is no complete DCP checkpoint",
                              "point at the folder dcp.save wrote (.metadata beside *.distcp files);"
                              " a save that stopped early never writes .metadata")
    try:
        with open_file(path) as f:
            md = pickle.load(f) if trust_pickle else _MetadataUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {e.strerror or e})",
                              "check that the file exists and that this user may read it") from e
    except _BlockedGlobal as e:
        raise CheckpointError(path, f"cannot be unpickled safely: {e}",
                              "if the folder comes from a source you trust completely, pass"
                              " trust_pickle=True") from e
    except Exception as e:  # noqa: BLE001 - any fault of the untrusted pickle is the file's
        raise CheckpointError(path, f"is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})",
                              "the save was interrupted; use an earlier checkpoint") from e
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointError(path, f"holds a {type(md).__name__}, not DCP metadata with storage data",
                              "point graft at a folder written by torch.distributed.checkpoint.save")
    return md


@dataclass(frozen=True)
class _Chunk:
    """One stored piece of a tensor: its place in the tensor and its record in a file."""

    fqn: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int
    transforms: tuple[str, ...]
    dtype: torch.dtype

    def where(self) -> str:
        return f"the record of {self.fqn!r} at bytes [{self.offset}, {self.offset + self.length}): "

    def region(self, full: torch.Tensor) -> torch.Tensor:
        for dim, (o, s) in enumerate(zip(self.offsets, self.sizes)):
            full = full.narrow(dim, o, s)
        return full


class DCPFolder(Checkpoint):
    format = "dcp"
    describes = "a torch.distributed.checkpoint folder (.metadata + *.distcp)"
    uses = frozenset({"container", "trust_pickle"})

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return path.is_dir() and (path / METADATA).is_file()

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.metadata = read_metadata(self.path, options.trust_pickle)
        sdm = self.metadata.state_dict_metadata
        tensors = {k: v for k, v in sdm.items() if isinstance(v, TensorStorageMetadata)}
        self._fqn = self._select(tensors, sdm)  # our key -> fqn in the checkpoint
        self._md = {k: tensors[fqn] for k, fqn in self._fqn.items()}
        # Every chunk checked against the tensor's shape before anything is allocated or read.
        self._chunks = {key: self._chunks_of(fqn, self._md[key]) for key, fqn in self._fqn.items()}
        self._records: dict[_Chunk, torch.Tensor | None] = {}
        self._step: int | None | bool = False  # False: not looked up yet

    # -- which keys are the model's ------------------------------------------------
    def _select(self, tensors: dict, sdm: dict) -> dict[str, str]:
        groups: dict[str, list[int]] = {}
        for fqn, md in sdm.items():
            counts = groups.setdefault(fqn.split(".")[0], [0, 0])
            counts[0 if fqn in tensors else 1] += 1
        self.groups = {g: {"tensors": t, "other": o} for g, (t, o) in groups.items()}
        container = self.options.container
        if container:
            prefix = container.rstrip(".") + "."
            picked = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
            if not picked:
                raise CheckpointError(self.path, f"container {container!r} holds no tensors; top-level"
                                      f" groups: {sorted(self.groups)}",
                                      "pass container= one of the groups above, or None to let graft find it")
            self.source = container
            return picked
        candidates = [k for k in tensors if k.split(".")[0] not in NON_MODEL_GROUPS]
        if not candidates:
            raise CheckpointError(self.path, f"holds no model tensors (only {sorted(self.groups)})",
                                  "pass container= the group that holds the model's tensors")
        heads = {k.split(".")[0] for k in candidates}
        if len(heads) == 1 and (head := heads.pop()) in MODEL_CONTAINERS and all("." in k for k in candidates):
            # The nested layout: dcp.save({"model": model.state_dict(), "optimizer": ...}).
            self.source = head
            return {k[len(head) + 1:]: k for k in candidates}
        self.source = None  # the model's keys are at the top level (torchtitan's layout)
        return {k: k for k in candidates}

    # -- metadata ------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._fqn)

    def meta(self, key: str) -> TensorMeta:
        md = self._md[key]
        files = {c.file for c in self._chunks[key]}
        return TensorMeta(key, tuple(md.size), md.properties.dtype,
                          files.pop() if len(files) == 1 else str(self.path))

    def files(self) -> list[str]:
        """Every data file the metadata names (model or not)."""
        return sorted({str(self.path / i.relative_path) for i in self.metadata.storage_data.values()
                       if isinstance(getattr(i, "relative_path", None), str)})

    def info(self) -> dict:
        files = self.files()
        ranks = {int(m.group(1)) for f in files if (m := _RANK_FILE.search(f))}
        other = {g: v for g, v in self.groups.items() if g in NON_MODEL_GROUPS or
                 (self.source and g != self.source)}
        return {
            **super().info(),
            "layout": f"nested under {self.source!r}" if self.source else "model keys at the top level",
            "step": self.step(),
            # DCP records no world size; each rank writes its own __<rank>_<n>.distcp files.
            "world_size": max(ranks) + 1 if ranks else None,
            "files": len(files),
            "missing_files": [as_path(f).name for f in files if not as_path(f).exists()] or None,
            "dcp_version": getattr(self.metadata, "version", None),
            # A string, so `graft inspect` prints it: what the folder holds beside the model.
            "not_model": ", ".join(f"{g} ({v['tensors']} tensors, {v['other']} other)"
                                   for g, v in other.items()) or None,
        }

    def step(self) -> int | None:
        """The training step: a scalar `train_state.step` tensor if saved, else the folder name."""
        if self._step is False:
            self._step = None
            sdm = self.metadata.state_dict_metadata
            for fqn in _STEP_KEYS:
                md = sdm.get(fqn)
                if md is not None and tuple(getattr(md, "size", (1,))) == () and \
                        not md.properties.dtype.is_floating_point:
                    try:
                        self._step = int(self._read_fqn(fqn, md))
                    except (CheckpointError, OSError):
                        pass  # a missing file is reported by missing_files, and on load
                    break
            if self._step is None and (m := _STEP_IN_NAME.search(self.path.name)):
                self._step = int(m.group(1))
        return self._step

    def _read_fqn(self, fqn: str, md) -> torch.Tensor:
        chunks = self._chunks_of(fqn, md)
        self._validate_chunks(chunks)
        out = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for chunk in chunks:
            chunk.region(out).copy_(self._load_chunk(chunk))
        return out

    # -- the metadata, checked -------------------------------------------------------
    def _chunks_of(self, fqn: str, md) -> list[_Chunk]:
        """The tensor's chunks, each with its storage record, after checking that they lie
        inside the tensor and tile it exactly (no gap, no overlap), and that each record is
        long enough for its chunk's values: a `.metadata` that lies fails here, naming the key."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        where = self.path / METADATA

        def bad(problem: str, cause: BaseException | None = None):
            err = CheckpointError(where, f"{fqn!r}: {problem}",
                                  "the metadata is damaged or from another save; use another checkpoint")
            raise err from cause

        try:
            shape = _int_tuple(md.size)
            dtype = md.properties.dtype
            raw_chunks = list(md.chunks)
        except Exception as e:  # noqa: BLE001 - malformed untrusted metadata
            bad(f"malformed tensor metadata ({type(e).__name__}: {e})", e)
        if shape is None or not isinstance(dtype, torch.dtype):
            bad(f"malformed tensor metadata (size {md.size!r}, dtype {getattr(md.properties, 'dtype', None)!r})")
        chunks = []
        for c in raw_chunks:
            offsets, sizes = _int_tuple(getattr(c, "offsets", None)), _int_tuple(getattr(c, "sizes", None))
            if offsets is None or sizes is None or len(offsets) != len(shape) or len(sizes) != len(shape):
                bad(f"a chunk with malformed offsets/sizes {getattr(c, 'offsets', None)!r},"
                    f" {getattr(c, 'sizes', None)!r} for a tensor of shape {list(shape)}")
            if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
                bad(f"the chunk at {list(offsets)} of size {list(sizes)} lies outside the tensor's"
                    f" shape {list(shape)}")
            info = self.metadata.storage_data.get(MetadataIndex(fqn, offsets))
            if info is None:
                bad(f"names no storage for the chunk at {list(offsets)}")
            rel, offset, length = (getattr(info, "relative_path", None), getattr(info, "offset", None),
                                   getattr(info, "length", None))
            if not isinstance(rel, (str, os.PathLike)) or type(offset) is not int or type(length) is not int \
                    or offset < 0 or length < 0:
                bad(f"malformed storage entry for the chunk at {list(offsets)}: {info!r}"[:300])
            rel = Path(rel)
            if rel.is_absolute() or ".." in rel.parts:
                bad(f"the chunk at {list(offsets)} names a file outside the checkpoint folder: {str(rel)!r}")
            transforms = tuple(getattr(info, "transform_descriptors", None) or ())
            nbytes = math.prod(sizes) * dtype.itemsize
            if not transforms and nbytes > length:
                bad(f"the chunk at {list(offsets)} of size {list(sizes)} needs {nbytes} bytes, but its"
                    f" record is {length} bytes")
            chunks.append(_Chunk(fqn, offsets, sizes, str(self.path / rel), offset, length, transforms, dtype))
        _check_tiling(shape, chunks, bad)
        return chunks

    # -- where the bytes are ---------------------------------------------------------
    def _record(self, chunk: _Chunk) -> torch.Tensor | None:
        """The chunk's record (a small torch.save archive inside the .distcp file) parsed and
        checked: the meta tensor it holds, with its bytes located; None if transformed."""
        if chunk not in self._records:
            t = None
            if not chunk.transforms:  # compressed or otherwise transformed records are loaded
                t = Archive(chunk.file, chunk.offset, chunk.length, context=chunk.where()).load()
                self._check_record(chunk, t)
                check_view(t, chunk.file, chunk.fqn)
            self._records[chunk] = t
        return self._records[chunk]

    @staticmethod
    def _check_record(chunk: _Chunk, t) -> None:
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(chunk.file, f"{chunk.where()}holds a {type(t).__name__}, not a tensor",
                                  "the metadata and the data disagree; use another checkpoint")
        if tuple(t.shape) != chunk.sizes or t.dtype != chunk.dtype:
            raise CheckpointError(chunk.file, f"{chunk.where()}holds {list(t.shape)} x {t.dtype}, the"
                                  f" metadata says {list(chunk.sizes)} x {chunk.dtype}",
                                  "the metadata and the data disagree; use another checkpoint")

    def _locate(self, chunk: _Chunk) -> Span | None:
        """Where the chunk's values are in its file, if stored raw and contiguous."""
        t = self._record(chunk)
        return None if t is None else span_of(t, chunk.file, chunk.fqn)

    def _load_chunk(self, chunk: _Chunk) -> torch.Tensor:
        """The chunk as a CPU tensor: its record's bytes, or DCP's stream transforms undone."""
        t = self._record(chunk)
        if t is not None:
            return read_tensor(t, chunk.file, chunk.fqn)
        # Only DCP knows its transform extensions (compression...); its own loader reads
        # them the same way. The record is in memory then: its length was checked against
        # the file's size.
        from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

        try:
            with open_file(chunk.file) as f:
                f.seek(chunk.offset)
                raw = io.BytesIO(f.read(chunk.length))
            stream = io.BytesIO(_StorageReaderTransforms().transform_load_stream(
                None, chunk.transforms, raw).read())
            t = torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any fault of the untrusted record is the file's
            raise CheckpointError(chunk.file, f"{chunk.where()}cannot be read through its transforms"
                                  f" {list(chunk.transforms)} ({type(e).__name__}: {str(e)[:200]})",
                                  "the file is corrupt, or read it with the torch version that wrote it") from e
        self._check_record(chunk, t)
        return t

    def span(self, key: str) -> Span | None:
        chunks = self._chunks[key]
        if len(chunks) != 1 or chunks[0].sizes != tuple(self._md[key].size):
            return None
        return self._locate(chunks[0])

    def pieces(self, key: str) -> list[Piece] | None:
        """One piece per chunk when every chunk is stored raw and fills a contiguous region of
        the tensor (a row block: how FSDP shards); None otherwise (see `_copy_into`)."""
        md = self._md[key]
        dtype = md.properties.dtype
        # Where each chunk's region starts in the tensor's bytes, from a tensor without memory.
        layout = torch.empty(tuple(md.size), dtype=dtype, device="meta")
        pieces = []
        for chunk in self._chunks[key]:
            loc = self._locate(chunk)
            region = chunk.region(layout)
            if loc is None or not region.is_contiguous():
                return None
            pieces.append(Piece(loc.file, loc.offset, loc.nbytes, region.storage_offset() * dtype.itemsize))
        return pieces

    # -- checks and reads ----------------------------------------------------------
    def validate(self, keys: Iterable[str]) -> None:
        """Every file the keys need exists and is long enough, and every record parses.

        DCP's own check in place of the base one: it names the rank of a missing file, and
        holds each whole record (which holds the values) against its file.
        """
        self._validate_chunks([c for k in keys for c in self._chunks[k]])

    def _validate_chunks(self, needed: list[_Chunk]) -> None:
        missing: dict[str, list[str]] = {}
        for c in needed:
            if not as_path(c.file).is_file():
                missing.setdefault(c.file, []).append(c.fqn)
        if missing:
            first, fqns = next(iter(missing.items()))
            m = _RANK_FILE.search(first)
            raise CheckpointError(
                first,
                f"missing: this .distcp file{f' (written by rank {m.group(1)})' if m else ''} holds"
                f" {len(fqns)} planned tensor chunk(s), e.g. {fqns[0]!r}"
                + (f"; also missing: {[Path(f).name for f in list(missing)[1:]]}" if len(missing) > 1 else ""),
                "copy every *.distcp file of the checkpoint into the folder, or use a complete checkpoint",
            )
        spans = [(c.fqn, Span(c.file, c.offset, c.length)) for c in needed]
        check_spans_fit(spans, file_sizes({c.file for c in needed}))
        for c in needed:
            self._record(c)

    def tensor(self, key: str) -> torch.Tensor:
        # Checked first: the fresh tensor is as large as the metadata says, so the metadata
        # must have been held against the files before it is allocated.
        self.validate([key])
        return super().tensor(key)

    def _copy_into(self, key: str, out: torch.Tensor, on_bytes: Callable[[int], None] | None) -> int:
        """Fill `out` chunk by chunk: a chunk whose region of `out` is contiguous is pread
        straight into it; a strided region (a column shard) or a transformed record
        (compressed) goes through a temporary of one chunk, so extra memory stays one chunk."""
        meta = self.meta(key)
        full = out.view(meta.shape)
        got = 0
        for chunk in self._chunks[key]:
            region = chunk.region(full)
            loc = self._locate(chunk)
            if loc is not None and region.is_contiguous():
                got += read_spans(loc.file, [(loc, region)], on_bytes)
                continue
            if loc is not None:
                tmp = torch.empty(chunk.sizes, dtype=meta.dtype)
                got += read_spans(loc.file, [(loc, tmp)], on_bytes)
            else:
                tmp = self._load_chunk(chunk)
                got += tmp.numel() * tmp.element_size()
                if on_bytes:
                    on_bytes(tmp.numel() * tmp.element_size())
            region.copy_(tmp)
        return got

    def _materialize(self, key: str) -> torch.Tensor:
        return self.tensor(key)


def _int_tuple(value) -> tuple[int, ...] | None:
    """A tuple of plain ints (torch.Size, list, tuple), or None if it is anything else."""
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        return None
    return tuple(value)


def _check_tiling(shape: tuple[int, ...], chunks: list[_Chunk], bad) -> None:
    """The chunks (already inside `shape`) cover every element exactly once: their volumes
    sum to the tensor's and no two overlap (a sweep along dim 0 compares only chunks whose
    row ranges meet, so row shards cost one comparison each)."""
    total = math.prod(shape)
    covered = sum(math.prod(c.sizes) for c in chunks)
    boxes = sorted((c for c in chunks if math.prod(c.sizes)), key=lambda c: c.offsets)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if shape and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            if all(bo < ao + as_ and ao < bo + bs for ao, as_, bo, bs in
                   zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                bad(f"the chunks at {list(a.offsets)} (size {list(a.sizes)}) and {list(b.offsets)}"
                    f" (size {list(b.sizes)}) overlap")
    if covered != total:
        bad(f"its chunks cover {covered} of the tensor's {total} elements (shape {list(shape)})")
