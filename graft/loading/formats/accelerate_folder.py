"""Folders written by `accelerate`: `Accelerator.save_state(dir)` and `Accelerator.save_model(model, dir)`.

save_state writes one weights file per prepared model (model.safetensors, model_1.safetensors,
... or pytorch_model.bin, pytorch_model_1.bin, ...; under FSDP pytorch_model_fsdp[_i].bin or a
DCP folder pytorch_model_fsdp_i/) beside optimizer.bin, scheduler.bin and one
random_states_<rank>.pkl per process, none of which are model weights. save_model writes
model.safetensors, or shards and model.safetensors.index.json (that sharded layout is the
Hugging Face one and opens as "hf-index", with the same result). This reader picks the
weights of one model (`model_index`) and hands them to the reader of that file
(SafetensorsFile, TorchFile, HFIndex, DCPFolder); nothing else in the folder is opened.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path

from graft.errors import CheckpointError
from graft.loading.formats.base import OpenOptions
from graft.loading.formats.delegate import Delegating
from graft.loading.formats.registry import open_checkpoint
from graft.storage import as_path

# Accelerate's own names for the files of save_state (accelerate.utils.constants).
_RNG_FILE = re.compile(r"random_states_(\d+)\.pkl$")
_STATE_MARKERS = re.compile(r"(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin$|scaler\.pt$|random_states_\d+\.pkl$")
_ITERATION_IN_NAME = re.compile(r"checkpoint_(\d+)$")  # ProjectConfiguration(automatic_checkpoint_naming)


def weight_candidates(i: int) -> list[str]:
    """The names accelerate gives model `i`'s weights, safest first."""
    if i == 0:
        return ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "pytorch_model_fsdp.bin", "pytorch_model_fsdp_0"]
    return [f"model_{i}.safetensors", f"pytorch_model_{i}.bin", f"pytorch_model_fsdp_{i}.bin",
            f"pytorch_model_fsdp_{i}"]


def find_models(folder: Path) -> list[list[str]]:
    """For each model index in the folder, the weight names present (first one is used)."""
    names = {p.name for p in as_path(folder).iterdir()}
    models = []
    while found := [n for n in weight_candidates(len(models)) if n in names]:
        models.append(found)
    return models


def read_step(rng_file: Path) -> int | None:
    """save_state's step counter, read from random_states_0.pkl without unpickling it.

    The file also holds numpy and Python RNG states, which weights_only=True refuses; so
    the pickle's opcodes are scanned for the top-level "step" key and the int after it.
    No object is built and no code runs.
    """
    try:
        with zipfile.ZipFile(rng_file) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            # Memo opcodes (BINPUT...) sit between a key and its value; they change nothing.
            ops = [op for op in pickletools.genops(z.read(name)) if "PUT" not in op[0].name
                   and op[0].name != "MEMOIZE"]
    except Exception:  # noqa: BLE001 - a best-effort fact for `graft inspect`, never fatal
        return None
    for (op, arg, _), (next_op, next_arg, _) in zip(ops, ops[1:]):
        if "UNICODE" in op.name and arg == "step" and next_op.name.startswith(("BININT", "LONG")):
            return int(next_arg)
    return None


class AccelerateFolder(Delegating):
    format = "accelerate"
    describes = "a folder from Accelerator.save_state or save_model (model.safetensors, pytorch_model.bin, model_1...)"
    uses = frozenset({"model_index"})

    @classmethod
    def can_open(cls, path: Path) -> bool:
        if not path.is_dir():
            return False
        names = [p.name for p in path.iterdir()]
        if not find_models(path):
            return False
        if any(_STATE_MARKERS.match(n) for n in names):
            return True
        # save_model's sharded output is exactly the Hugging Face layout (an index beside its
        # shards) and stays the HF index reader's ("hf-index"), as save_pretrained folders do;
        # a folder holding one weights file is ours (no other reader opens it).
        return not any(n.endswith(".index.json") for n in names)

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        if not self.path.is_dir():
            raise CheckpointError(self.path, "is not a folder; accelerate's save_state/save_model write folders",
                                  "point at the folder, or leave format=None")
        names = [p.name for p in self.path.iterdir()]
        self.models = find_models(self.path)
        if not self.models:
            raise CheckpointError(self.path, f"holds no model weights under accelerate's names"
                                  f" ({', '.join(weight_candidates(0)[:3])}, ...)",
                                  "point at the folder save_state or save_model wrote")
        self.written_by = "save_state" if any(_STATE_MARKERS.match(n) for n in names) else "save_model"
        self.rng_ranks = sorted(int(m.group(1)) for n in names if (m := _RNG_FILE.match(n)))
        i = options.model_index
        if not 0 <= i < len(self.models):
            raise CheckpointError(
                self.path, f"model_index={i}, but the folder holds {len(self.models)} model(s):"
                f" {[m[0] for m in self.models]}",
                f"pass model_index between 0 and {len(self.models) - 1}",
            )
        self.weights = self.models[i][0]
        # Several copies of one model (safetensors and pickle, whole and sharded): the first
        # in weight_candidates' order (safetensors first) is read, and info() names the rest.
        self.ignored = self.models[i][1:]
        self.inner = open_checkpoint(self.path / self.weights, options)
        self.source = self.weights + (f" ({self.inner.source})" if self.inner.source else "")

    def info(self) -> dict:
        step = read_step(self.path / "random_states_0.pkl") if 0 in self.rng_ranks else None
        m = _ITERATION_IN_NAME.search(self.path.name)
        return {
            **super().info(),
            "written_by": self.written_by,
            "models": len(self.models),
            "model_index": self.options.model_index,
            "weights": self.weights,
            "weights_format": self.inner.format,
            "ignored_copies": self.ignored or None,
            "step": step,
            "save_iteration": int(m.group(1)) if m else None,
            # save_state writes one random_states_<rank>.pkl per process.
            "world_size": len(self.rng_ranks) or None,
            **self.inner_info(),
        }
