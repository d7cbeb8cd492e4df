"""The torch.distributed.checkpoint layout, written by graft rather than by `dcp.save`.

Why not torch's FileSystemWriter: its write loop (`_write_files_from_queue`, torch 2.14)
keeps every resolved tensor of a file in a dict until the file is done, so even fed
lazily from a planner it holds the whole model; `format_utils.torch_save_to_dcp` loads the
whole state dict first. The layout itself is small and stable, so this writes it: one
`__0_0.distcp` file holding, per tensor, a torch.save archive of that tensor (what
FileSystemWriter writes with its default TORCH_SAVE serialization; written here by
`TorchZip`, streamed), and `.metadata`, a pickle of torch's own `Metadata` classes: each
tensor one chunk at offset zero, so `dcp.load` reads it into any sharding at any world size.
`dcp_key` nests the keys under one name ("model.layer.weight", planner_data
("model", "layer.weight")), as a state dict {"model": {...}} saved by dcp.save would be.
"""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from graft.conversion.staging import fsync_file
from graft.conversion.stream import TensorStream
from graft.conversion.writers import OutFile, Writer
from graft.conversion.writers.torch_zip import TorchZip, tensor_ref

DATA_FILE = "__0_0.distcp"
METADATA_FILE = ".metadata"


def _dcp_version() -> str:
    try:
        from torch.distributed.checkpoint.version import CURRENT_DCP_VERSION
    except ImportError:  # older torch: no version field is written at all
        return None
    return CURRENT_DCP_VERSION


class DCPWriter(Writer):
    target = "dcp"
    folder = True

    def _path(self, name: str) -> tuple[str, ...]:
        return (self.options.dcp_key, name) if self.options.dcp_key else (name,)

    def layout(self) -> list[OutFile]:
        return [OutFile(DATA_FILE, tuple(self.tensors)), OutFile(METADATA_FILE, ())]

    def write(self, tmp: Path, stream: TensorStream) -> None:
        tensors_meta, storage, planner = {}, {}, {}
        with open(tmp / DATA_FILE, "wb") as f:
            for out, chunks in stream.tensors(self.tensors):
                offset = f.tell()
                TorchZip(f).write_archive(tensor_ref("0", out), [chunks], [out.nbytes])
                fqn = ".".join(self._path(out.name))
                zeros = torch.Size([0] * len(out.shape))
                tensors_meta[fqn] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=out.dtype), size=torch.Size(out.shape),
                    chunks=[ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(out.shape))])
                storage[MetadataIndex(fqn=fqn, offset=zeros, index=0)] = _StorageInfo(
                    relative_path=DATA_FILE, offset=offset, length=f.tell() - offset)
                planner[fqn] = self._path(out.name)
            fsync_file(f)
        metadata = Metadata(state_dict_metadata=tensors_meta, planner_data=planner, storage_data=storage,
                            storage_meta=StorageMeta(save_id=str(uuid.uuid4())))
        if (version := _dcp_version()) is not None:
            metadata.version = version
        with open(tmp / METADATA_FILE, "wb") as f:
            pickle.dump(metadata, f)
            fsync_file(f)
