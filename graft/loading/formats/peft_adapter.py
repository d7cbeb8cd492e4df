"""PEFT adapter folders: what `PeftModel.save_pretrained` writes.

adapter_config.json (peft_type, r, target_modules, ...) beside adapter_model.safetensors
(adapter_model.bin from older versions). PEFT saves the adapter's tensors without the adapter's
name (`...query.lora_A.weight`), while a PEFT-wrapped model names them with it
(`...query.lora_A.default.weight`); PEFT's own loader inserts the name. The plan does the same
from the model's key names (`plan.insert_segment`, asked for through `info()["key_segment"]`),
for whatever adapter type and name the model has, and reports it: no rename rule is needed.
"""

from __future__ import annotations

from pathlib import Path

from graft.errors import CheckpointError
from graft.loading.formats import json_file
from graft.loading.formats.base import OpenOptions
from graft.loading.formats.delegate import Delegating
from graft.loading.formats.failures import checkpoint_errors
from graft.loading.formats.registry import open_checkpoint

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class PeftAdapter(Delegating):
    format = "peft"
    describes = "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
    uses = frozenset({"adapter_name"})

    @classmethod
    def can_open(cls, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG).is_file() and any((path / n).is_file() for n in WEIGHTS)

    def __init__(self, path, options: OpenOptions):
        super().__init__(path, options)
        if not self.path.is_dir():
            raise CheckpointError(self.path, "is not a folder; PEFT adapters are folders",
                                  "point at the folder PeftModel.save_pretrained wrote, or leave format=None")
        with checkpoint_errors(self.path / CONFIG):
            self.config = json_file.read(self.path / CONFIG, "PEFT adapter config")
        self.weights = next((n for n in WEIGHTS if (self.path / n).is_file()), None)
        if self.weights is None:
            raise CheckpointError(self.path, f"holds {CONFIG} but no {' or '.join(WEIGHTS)}",
                                  "copy the adapter's weights file into the folder")
        self.inner = open_checkpoint(self.path / self.weights, options)
        self.source = self.weights
        self.adapter_name = options.adapter_name

    def info(self) -> dict:
        keep = ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "base_model_name_or_path",
                "task_type")
        return {**super().info(), "weights": self.weights, **{k: self.config.get(k) for k in keep},
                # The plan inserts the adapter's name into the keys (see plan.insert_segment); told
                # through info() so that ranks planning from rank 0's metadata do the same.
                "key_segment": {"what": "PEFT adapter name", "name": self.adapter_name, "option": "adapter_name"},
                **self.inner_info()}
