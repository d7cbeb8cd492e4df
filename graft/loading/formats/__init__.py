"""One reader per checkpoint format, and `open_checkpoint`, which picks the right one.

A new format is one module here with a `Checkpoint` subclass, added to `READERS` below
(the registry, `registry.READERS`, is filled here). The
order matters: folder formats that contain files another reader would also accept come
first (an accelerate folder holds a model.safetensors; a Trainer checkpoint is a transformers
folder with more in it; a transformers or PEFT folder has no accelerate state files but the
same weights names).
"""

from __future__ import annotations

from graft.loading.formats.accelerate_folder import AccelerateFolder
from graft.loading.formats.base import Checkpoint, OpenOptions, TensorMeta
from graft.loading.formats.dcp import DCPFolder
from graft.loading.formats.deepspeed_folder import DeepSpeedFolder
from graft.loading.formats.graft_run import GraftRun
from graft.loading.formats.hf_folder import HFTrainerFolder, TransformersFolder
from graft.loading.formats.hf_index import HFIndex
from graft.loading.formats.peft_adapter import PeftAdapter
from graft.loading.formats.reading import Piece, Span
from graft.loading.formats.registry import FILE_READERS, READERS, detect, open_checkpoint
from graft.loading.formats.safetensors_file import SafetensorsFile
from graft.loading.formats.torch_file import TorchFile

# The order matters (see above); one-file readers last.
READERS.extend([GraftRun, DeepSpeedFolder, DCPFolder, HFTrainerFolder, TransformersFolder, PeftAdapter,
                AccelerateFolder, HFIndex, SafetensorsFile, TorchFile])
FILE_READERS.extend([SafetensorsFile, TorchFile])

__all__ = ["Checkpoint", "OpenOptions", "Piece", "Span", "TensorMeta", "READERS", "detect", "open_checkpoint"]
