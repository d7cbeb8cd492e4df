"""Files written by `torch.save` (.pt .pth .bin .ckpt): always `weights_only=True`.

Metadata comes from unpickling with `map_location="meta"`: torch then builds every tensor
on the meta device and records where its storage starts in the zip archive, so names,
shapes, dtypes and byte offsets are known without reading one tensor byte. The data are
then pread from those offsets. Old (pre-1.6, non-zip) files have no offsets and are read
whole, once.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from graft.errors import CheckpointError
from graft.loading.formats.base import Checkpoint, OpenOptions, Span, TensorMeta

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")
# Where training code usually keeps the model's state dict, in the order we look.
CONTAINER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_state",
    "params",
    "weights",
)
_LEGACY_MAGIC = b"\x80"  # a pickle protocol byte: torch files before the zip format


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _tensor_items(obj: Mapping) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def find_state_dict(obj, path: Path, container: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a loaded object, and the container key it came from."""
    if container:
        node = obj
        for part in container.split("."):
            if not isinstance(node, Mapping) or part not in node:
                top = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointError(
                    path, f"container {container!r} not found (at {part!r}); top-level keys: {top}",
                    "pass container= one of the keys above, or None to let graft find it",
                )
            node = node[part]
        if not _is_tensor_dict(node):
            raise CheckpointError(path, f"container {container!r} holds no tensors",
                                  "pass container= the key that holds the state dict")
        return _tensor_items(node), container
    if not isinstance(obj, Mapping):
        if isinstance(obj, torch.nn.Module):
            return _tensor_items(obj.state_dict()), "<module>.state_dict()"
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict",
                              "save model.state_dict() instead of the object")
    values = list(obj.values())
    if values and sum(isinstance(v, torch.Tensor) for v in values) * 2 >= len(values):
        return _tensor_items(obj), None
    for key in CONTAINER_KEYS:
        if _is_tensor_dict(obj.get(key)):
            return _tensor_items(obj[key]), key
        if isinstance(obj.get(key), torch.nn.Module):
            return _tensor_items(obj[key].state_dict()), key
    nested = [str(k) for k, v in obj.items() if _is_tensor_dict(v)]
    if len(nested) == 1:
        return _tensor_items(obj[nested[0]]), nested[0]
    if nested:
        raise CheckpointError(
            path, f"several entries hold tensors: {nested}; which one is the model is ambiguous",
            f"pass container= one of {nested}",
        )
    raise CheckpointError(
        path, f"no state dict found; top-level keys: {sorted(map(str, obj))[:20]}",
        "pass container= the key that holds the model's tensors",
    )


def blocked_global(message: str) -> str | None:
    """The global a weights_only unpickler refused, from torch's message."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message) or re.search(
        r"GLOBAL ([\w.]+) was not an allowed global", message
    )
    return m.group(1) if m else None


def stand_in(qualified_name: str) -> type:
    """An inert class that takes the place of a pickled global: state is kept, no code runs."""
    module, _, name = qualified_name.rpartition(".")

    def __init__(self, *args, **kwargs):
        # Globals pickled as calls (enums, namedtuples) arrive with their arguments.
        self.__dict__["_args"] = args
        self.__dict__["_kwargs"] = kwargs

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    return type(name, (), {"__module__": module, "__init__": __init__, "__setstate__": __setstate__,
                           "__reduce__": object.__reduce__})


def safe_load(path: Path, *, map_location, mmap: bool, allow_globals=(), trust_pickle=False):
    """`torch.load` with weights_only=True, turning every failure into a CheckpointError."""
    if trust_pickle:
        load = lambda: torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)  # noqa: E731
    else:
        globals_ = [(stand_in(name), name) for name in allow_globals]

        def load():
            with torch.serialization.safe_globals(globals_):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)

    try:
        return load()
    except pickle.UnpicklingError as e:
        name = blocked_global(str(e))
        if name is None:
            raise CheckpointError(path, f"cannot be unpickled safely: {str(e).splitlines()[0]}",
                                  "the file is corrupt or not a torch checkpoint") from e
        raise CheckpointError(
            path,
            f"the pickle needs the global {name!r}, which weights_only=True does not allow"
            " (graft never retries with unsafe unpickling)",
            f"save only the state dict; or pass allow_globals=[{name!r}] to rebuild it as an"
            " inert stand-in; or, for a file you trust completely, trust_pickle=True",
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError) as e:
        raise CheckpointError(
            path, f"is corrupt or truncated ({str(e).splitlines()[0]})",
            "the file was cut short or damaged; write or copy it again",
        ) from e


class TorchFile(Checkpoint):
    format = "torch"
    describes = "a torch.save file (.pt .pth .bin .ckpt)"

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix in SUFFIXES:
            return True
        with open(path, "rb") as f:
            head = f.read(4)
        return head.startswith(b"PK\x03\x04") or head[:1] == _LEGACY_MAGIC

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        size = self.path.stat().st_size
        if size == 0:
            raise CheckpointError(self.path, "is empty (0 bytes)",
                                  "the save was interrupted; use an earlier checkpoint")
        self._zip = zipfile.is_zipfile(self.path)
        load = dict(allow_globals=options.allow_globals, trust_pickle=options.trust_pickle)
        if self._zip:
            obj = safe_load(self.path, map_location="meta", mmap=False, **load)
        else:
            # Legacy format: no offsets to read from, so the file is read once, whole.
            obj = safe_load(self.path, map_location="cpu", mmap=False, **load)
            self.bytes_read += size
        self._tensors, self.source = find_state_dict(obj, self.path, options.container)
        self._mapped: dict[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> TensorMeta:
        t = self._tensors[key]
        return TensorMeta(key, tuple(t.shape), t.dtype, str(self.path))

    def info(self) -> dict:
        return {**super().info(), "container": self.source}

    def span(self, key: str) -> Span | None:
        t = self._tensors[key]
        if not (self._zip and t.is_contiguous()):
            return None
        base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        if base is None:
            return None
        return Span(str(self.path), base + t.storage_offset() * t.element_size(),
                    t.numel() * t.element_size())

    def _materialize(self, key: str) -> torch.Tensor:
        if not self._zip:
            return self._tensors[key]
        if self._mapped is None:
            # Only for tensors without a plain byte range (non-contiguous views): map the
            # file once and let the OS page in what is touched.
            obj = safe_load(self.path, map_location="cpu", mmap=True,
                            allow_globals=self.options.allow_globals,
                            trust_pickle=self.options.trust_pickle)
            container = self.source if self.source and not self.source.startswith("<") else None
            self._mapped, _ = find_state_dict(obj, self.path, container)
        return self._mapped[key]

    def close(self) -> None:
        self._mapped = None
