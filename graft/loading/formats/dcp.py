"""torch.distributed.checkpoint folders: a `.metadata` file and `__<rank>_<n>.distcp` files.

Names, shapes and dtypes come from `.metadata` alone. Each tensor is stored as one or more
chunks (one per rank under FSDP), each chunk a small `torch.save` record at (file, offset,
length). We read no record whole: the record's zip directory gives the byte range of its
values, and those bytes are pread straight into the destination's region of the tensor.
No process group is needed, and only the planned tensors are read.

`.metadata` is a pickle. It is unpickled with an allowlist of DCP's own metadata classes
(no code from the file runs); `trust_pickle=True` lifts that for files you trust.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from graft.errors import CheckpointError
from graft.loading.formats.base import Checkpoint, OpenOptions, Span, TensorMeta, read_spans

METADATA = ".metadata"
# Top-level groups that training code saves beside the model; never offered as model keys.
# ("state"/"param_groups": an optimizer state dict flattened at the top level.)
NON_MODEL_GROUPS = frozenset({
    "optimizer", "optimizers", "optim", "optim_state", "optimizer_state", "state", "param_groups",
    "lr_scheduler", "lr_schedulers", "scheduler", "schedulers", "train_state", "trainer",
    "dataloader", "data_loader", "rng", "rng_state", "rng_states", "extra", "extra_state",
})
# Keys under which code nests the model's state dict (torchtitan before its flat layout).
MODEL_CONTAINERS = ("model", "module", "model_state_dict", "state_dict")
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


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


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
        with open(path, "rb") as f:
            md = pickle.load(f) if trust_pickle else _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(path, f"cannot be unpickled safely: {e}",
                              "if the folder comes from a source you trust completely, pass"
                              " trust_pickle=True") from e
    except (EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"is corrupt or truncated ({type(e).__name__}: {e})",
                              "the save was interrupted; use an earlier checkpoint") from e
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointError(path, f"holds a {type(md).__name__}, not DCP metadata with storage data",
                              "point graft at a folder written by torch.distributed.checkpoint.save")
    return md


class _FileSlice(io.RawIOBase):
    """A read-only view of bytes [start, start + length) of an open file, as its own file.

    torch.load reads a record's zip directory through it, so only those few KB are read.
    """

    def __init__(self, f, start: int, length: int):
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got
        return got


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

    def region(self, full: torch.Tensor) -> torch.Tensor:
        for dim, (o, s) in enumerate(zip(self.offsets, self.sizes)):
            full = full.narrow(dim, o, s)
        return full


class DCPFolder(Checkpoint):
    format = "dcp"
    describes = "a torch.distributed.checkpoint folder (.metadata + *.distcp)"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return path.is_dir() and (path / METADATA).is_file()

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

        self.metadata = read_metadata(self.path, options.trust_pickle)
        sdm = self.metadata.state_dict_metadata
        tensors = {k: v for k, v in sdm.items() if isinstance(v, TensorStorageMetadata)}
        self._fqn = self._select(tensors, sdm)  # our key -> fqn in the checkpoint
        self._md = {k: tensors[fqn] for k, fqn in self._fqn.items()}
        self._chunks: dict[str, list[_Chunk]] = {}
        for key, fqn in self._fqn.items():
            chunks = []
            for c in self._md[key].chunks:
                info = self.metadata.storage_data.get(MetadataIndex(fqn, c.offsets))
                if info is None:
                    raise CheckpointError(self.path / METADATA,
                                          f"names no storage for chunk {list(c.offsets)} of {fqn!r}",
                                          "the metadata is inconsistent; use another checkpoint")
                chunks.append(_Chunk(fqn, tuple(c.offsets), tuple(c.sizes),
                                     str(self.path / info.relative_path), int(info.offset), int(info.length),
                                     tuple(getattr(info, "transform_descriptors", None) or ())))
            self._chunks[key] = chunks
        self._located: dict[_Chunk, tuple[int, int] | None] = {}
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
        return sorted({str(self.path / i.relative_path) for i in self.metadata.storage_data.values()})

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
            "missing_files": [Path(f).name for f in files if not os.path.exists(f)] or None,
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
        from torch.distributed.checkpoint.metadata import MetadataIndex

        (c,) = md.chunks
        info = self.metadata.storage_data[MetadataIndex(fqn, c.offsets)]
        chunk = _Chunk(fqn, tuple(c.offsets), tuple(c.sizes), str(self.path / info.relative_path),
                       int(info.offset), int(info.length), tuple(getattr(info, "transform_descriptors", None) or ()))
        return self._load_chunk(chunk)

    # -- where the bytes are ---------------------------------------------------------
    def _locate(self, chunk: _Chunk) -> tuple[int, int] | None:
        """(absolute offset, nbytes) of the chunk's values if stored raw and contiguous."""
        if chunk in self._located:
            return self._located[chunk]
        loc = None
        if not chunk.transforms:  # compressed or otherwise transformed records are loaded
            with open(chunk.file, "rb") as f:
                t = self._torch_load(chunk, _FileSlice(f, chunk.offset, chunk.length), "meta")
            base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
            if base is not None and t.is_contiguous() and tuple(t.shape) == chunk.sizes:
                start = base + t.storage_offset() * t.element_size()
                nbytes = t.numel() * t.element_size()
                if start + nbytes > chunk.length:
                    raise CheckpointError(chunk.file, f"the record of {chunk.fqn!r} at byte {chunk.offset}"
                                          " places its values beyond the record's end",
                                          "the file is corrupt; use another checkpoint")
                loc = (chunk.offset + start, nbytes)
        self._located[chunk] = loc
        return loc

    def _torch_load(self, chunk: _Chunk, stream, map_location) -> torch.Tensor:
        try:
            t = torch.load(stream, map_location=map_location, weights_only=True)
        except Exception as e:
            raise CheckpointError(chunk.file, f"the record of {chunk.fqn!r} at bytes [{chunk.offset},"
                                  f" {chunk.offset + chunk.length}) cannot be read ({str(e).splitlines()[0]})",
                                  "the file is corrupt or truncated; use another checkpoint") from e
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(chunk.file, f"the record of {chunk.fqn!r} holds a {type(t).__name__}",
                                  "the metadata and the data disagree; use another checkpoint")
        return t

    def _load_chunk(self, chunk: _Chunk) -> torch.Tensor:
        """The chunk as a tensor, through torch.load (and DCP's stream transforms if any)."""
        with open(chunk.file, "rb") as f:
            stream = _FileSlice(f, chunk.offset, chunk.length)
            if chunk.transforms:
                # Only DCP knows its transform extensions (compression...); its own loader
                # reads them the same way.
                from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

                try:
                    stream = io.BytesIO(_StorageReaderTransforms().transform_load_stream(
                        None, chunk.transforms, stream).read())
                except Exception as e:
                    raise CheckpointError(chunk.file, f"cannot undo the transforms {list(chunk.transforms)}"
                                          f" of {chunk.fqn!r}: {e}",
                                          "read it with the torch version that wrote it") from e
            t = self._torch_load(chunk, stream, "cpu")
        return t.reshape(chunk.sizes)

    def span(self, key: str) -> Span | None:
        chunks = self._chunks[key]
        if len(chunks) != 1 or chunks[0].sizes != tuple(self._md[key].size):
            return None
        loc = self._locate(chunks[0])
        return None if loc is None else Span(chunks[0].file, *loc)

    # -- checks and reads ----------------------------------------------------------
    def validate(self, keys: Iterable[str]) -> None:
        """Every file the keys need exists and is long enough, and every record parses."""
        needed = [c for k in keys for c in self._chunks[k]]
        missing: dict[str, list[str]] = {}
        for c in needed:
            if not os.path.isfile(c.file):
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
        sizes: dict[str, int] = {}
        for c in needed:
            size = sizes.setdefault(c.file, os.path.getsize(c.file))
            if c.offset + c.length > size:
                raise CheckpointError(c.file, f"truncated: {c.fqn!r} needs bytes [{c.offset}, {c.offset + c.length})"
                                      f" but the file has {size} bytes",
                                      "the file was cut short (interrupted copy); copy it again")
        for c in needed:
            self._locate(c)

    def read_into(
        self,
        requests: Sequence[tuple[str, torch.Tensor]],
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Fill each `out` with `key`, chunk by chunk, reading raw bytes wherever possible.

        A chunk whose region of `out` is contiguous (a row block: how FSDP shards) is
        pread straight into it, all such reads grouped by file in offset order. Other
        regions go through a temporary of one chunk, so extra memory stays one chunk.
        """
        direct: dict[str, list[tuple[Span, torch.Tensor]]] = {}
        for key, out in requests:
            meta = self.meta(key)
            assert out.device.type == "cpu" and out.is_contiguous(), key
            assert out.dtype == meta.dtype and out.numel() == meta.numel, key
            full = out.view(meta.shape)
            for chunk in self._chunks[key]:
                region = chunk.region(full)
                loc = self._locate(chunk)
                if loc is not None and region.is_contiguous():
                    direct.setdefault(chunk.file, []).append((Span(chunk.file, *loc), region))
                    continue
                if loc is not None:
                    tmp = torch.empty(chunk.sizes, dtype=meta.dtype)
                    self.bytes_read += read_spans(chunk.file, [(Span(chunk.file, *loc), tmp)], on_bytes)
                else:
                    tmp = self._load_chunk(chunk)
                    self.bytes_read += tmp.numel() * tmp.element_size()
                    if on_bytes:
                        on_bytes(tmp.numel() * tmp.element_size())
                region.copy_(tmp)
        for file, items in direct.items():
            items.sort(key=lambda item: item[0].offset)
            self.bytes_read += read_spans(file, items, on_bytes)

    def _materialize(self, key: str) -> torch.Tensor:
        return self.tensor(key)
