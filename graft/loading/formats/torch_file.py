"""Files written by `torch.save` (.pt .pth .bin .ckpt): always `weights_only=True`.

Metadata comes from unpickling onto the meta device (`torch_zip.Archive`): every storage is
located in its own zip record, checked against the pickle, so names, shapes, dtypes and byte
offsets are known without reading one tensor byte. The data are then pread from those
offsets. Old (pre-1.6, non-zip) files have no offsets and are read whole, once.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from graft.errors import CheckpointError
from graft.loading.formats.base import CONTAINER_KEYS, Checkpoint, OpenOptions, TensorMeta
from graft.loading.formats.pickled import (
    INERT_BY_DEFAULT, allow_patterns, global_name, is_module, load_with_stand_ins, module_tensors, not_a_model,
)
from graft.loading.formats.reading import Span
from graft.loading.formats.torch_zip import (
    MAGIC, Archive, blocked_global, check_view, is_archive, read_tensor, span_of, stand_in, stored,
)
from graft.storage import is_remote, open_file

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")
_LEGACY_MAGIC = b"\x80"  # a pickle protocol byte: torch files before the zip format
__all__ = ["TorchFile", "find_state_dict", "safe_load", "stand_in", "blocked_global"]


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
        if is_module(node):
            return module_tensors(node), f"{container} (pickled module {global_name(node)})"
        if not _is_tensor_dict(node):
            raise CheckpointError(path, f"container {container!r} holds no tensors",
                                  "pass container= the key that holds the state dict")
        return _tensor_items(node), container
    if not isinstance(obj, Mapping):
        if is_module(obj):
            return module_tensors(obj), f"pickled module {global_name(obj)}"
        raise not_a_model(path, obj) or CheckpointError(
            path, f"holds a {type(obj).__name__}, not a state dict", "save model.state_dict() instead of the object")
    values = list(obj.values())
    if values and sum(isinstance(v, torch.Tensor) for v in values) * 2 >= len(values):
        return _tensor_items(obj), None
    for key in CONTAINER_KEYS:
        if _is_tensor_dict(obj.get(key)):
            return _tensor_items(obj[key]), key
        if is_module(obj.get(key)):
            return module_tensors(obj[key]), f"{key} (pickled module {global_name(obj[key])})"
    nested = [str(k) for k, v in obj.items() if _is_tensor_dict(v)]
    if len(nested) == 1:
        return _tensor_items(obj[nested[0]]), nested[0]
    if nested:
        raise CheckpointError(
            path, f"several entries hold tensors: {nested}; which one is the model is ambiguous",
            f"pass container= one of {nested}",
        )
    raise not_a_model(path, obj) or CheckpointError(
        path, f"no state dict found; top-level keys: {sorted(map(str, obj))[:20]}",
        "pass container= the key that holds the model's tensors",
    )


def safe_load(path: Path, *, map_location, mmap: bool, allow_globals=(), trust_pickle=False):
    """`torch.load` with weights_only=True, for legacy (pre-zip) files only; every failure is
    a CheckpointError. Zip archives go through `torch_zip.Archive`, which locates each
    storage from its own record instead of torch's computed offsets."""
    if is_remote(path):  # an object: torch reads the legacy stream from a ranged-read file
        path, mmap = open_file(path), False
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
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {e.strerror or e})",
                              "check that the file exists and that this user may read it") from e
    except Exception as e:  # noqa: BLE001 - any fault of the untrusted file is the file's
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            path, f"is corrupt or truncated ({type(e).__name__}{': ' + first[:200] if first else ''})",
            "the file was cut short or damaged; write or copy it again",
        ) from e


class TorchFile(Checkpoint):
    format = "torch"
    describes = "a torch.save file (.pt .pth .bin .ckpt)"
    uses = frozenset({"container", "allow_globals", "trust_pickle"})

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix in SUFFIXES:
            return True
        try:
            with open_file(path) as f:
                head = f.read(4)
        except OSError:
            return False  # unreadable: the open that follows reports why
        return head.startswith(MAGIC) or head[:1] == _LEGACY_MAGIC

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        try:
            size = self.path.stat().st_size
            self._zip = size > 0 and is_archive(self.path)
        except OSError as e:
            raise CheckpointError(self.path, f"cannot be read ({type(e).__name__}: {e.strerror or e})",
                                  "check that the file exists and that this user may read it") from e
        if size == 0:
            raise CheckpointError(self.path, "is empty (0 bytes)",
                                  "the save was interrupted; use an earlier checkpoint")
        try:
            obj, _ = load_with_stand_ins(self._load, tuple(options.allow_globals))
        except CheckpointError as e:
            raise self._refusal(e) from e.__cause__
        self._tensors, self.source = find_state_dict(obj, self.path, options.container)
        if self._zip:
            # Every view inside its storage, before the plan or any copy.
            for key, t in self._tensors.items():
                if stored(t) is not None:
                    check_view(t, self.path, key)

    def _load(self, allow_globals: list[str]):
        load = dict(allow_globals=allow_globals, trust_pickle=self.options.trust_pickle)
        if self._zip:
            # Tensors come back on the meta device, each storage located in its own record.
            return Archive(self.path).load(**load)
        # Legacy format: no records to read from, so the file is read once, whole.
        obj = safe_load(self.path, map_location="cpu", mmap=False, **load)
        self.bytes_read = self.path.stat().st_size  # once, however many tries
        return obj

    def _refusal(self, refused: CheckpointError) -> CheckpointError:
        """The error for a pickle that needs globals nobody allowed, with the way out that works.

        The file is read once more with every refused global stood in (inert: no code from it
        runs) to see what it holds: a non-model file is named as such; a state dict or a whole
        module is reachable by allow-listing every global it needs, all named at once.
        """
        try:
            obj, stood_in = load_with_stand_ins(self._load, ("*",))
        except CheckpointError:
            return refused  # not a global problem after all (damaged bytes): the first error says it
        needed = allow_patterns([n for n in stood_in if n not in INERT_BY_DEFAULT])
        way = f"pass allow_globals={needed!r}"
        if (error := not_a_model(self.path, obj)) is not None:
            return error
        try:
            _, source = find_state_dict(obj, self.path, self.options.container)
        except CheckpointError as e:
            return CheckpointError(self.path, f"needs the globals {needed} and then: {e.problem}",
                                   f"{e.way_out}, and {way}")
        if "pickled module" in (source or ""):
            return CheckpointError(
                self.path, f"holds a whole pickled module, from torch.save(model) ({source}): its"
                " classes are globals weights_only=True does not allow (graft never retries with"
                " unsafe unpickling)",
                f"{way} to read its parameters and buffers off inert stand-ins (no code from the file"
                " runs); or save model.state_dict() instead")
        return CheckpointError(
            self.path, f"the pickle needs the globals {needed}, which weights_only=True does not allow"
            " (graft never retries with unsafe unpickling)",
            f"{way} to rebuild them as inert stand-ins; or, for a file you trust completely, trust_pickle=True")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> TensorMeta:
        t = self._tensors[key]
        return TensorMeta(key, tuple(t.shape), t.dtype, str(self.path))

    def info(self) -> dict:
        return {**super().info(), "container": self.source}

    def span(self, key: str) -> Span | None:
        return span_of(self._tensors[key], self.path, key) if self._zip else None

    def _materialize(self, key: str) -> torch.Tensor:
        if not self._zip:
            return self._tensors[key]
        # A view that is no plain byte range (transposed...): read the bytes it spans.
        return read_tensor(self._tensors[key], self.path, key)
