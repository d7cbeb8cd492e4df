"""Shared by the bcast_ and wrap_ scripts: the seeded source model, checks, result files.

Every rank can rebuild the checkpoint's values from the seed, so a rank that never sees
the file can still check, bitwise, what it received.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from graft.models import tiny_vgg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (checks)
import checks  # noqa: E402

SEED = 1234
MISSING = "/nonexistent/graft-test/never-here.safetensors"


def source_model(**kwargs) -> torch.nn.Module:
    """The model the checkpoints in the tests were saved from."""
    torch.manual_seed(SEED)
    return tiny_vgg(**kwargs)


def expected_state(**kwargs) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in source_model(**kwargs).state_dict().items()}


def changed_model(rank: int, num_classes: int = 10, **kwargs) -> torch.nn.Module:
    """checks.changed_model (rnn3; the source's 10 classes unless told), seeded differently on
    each rank (100 + rank): only the broadcast can make the new block equal everywhere."""
    return checks.changed_model(seed=100 + rank, num_classes=num_classes, **kwargs)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def state_digest(model: torch.nn.Module, prefix: str = "") -> str:
    items = sorted((k, v) for k, v in model.state_dict().items() if k.startswith(prefix))
    return digest(v for _, v in items)


def loaded_bitwise_equal(model: torch.nn.Module, expected: dict, report) -> list[str]:
    """Loaded names whose values differ from the checkpoint's (empty when all match)."""
    state = model.state_dict()
    entries = report.plan.entries
    bad = []
    for n in report.loaded:
        e = entries[n]
        key = e.ckpt_key if e.tied_to is None else entries[e.tied_to].ckpt_key
        key = key.removeprefix("module.")
        if not torch.equal(state[n].cpu(), expected[key].to(state[n].dtype)):
            bad.append(n)
    return bad


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_gloo() -> tuple[int, int]:
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


class Results:
    """One JSON file per rank; the test reads them all."""

    def __init__(self, out_dir: str, rank: int):
        self.path = Path(out_dir) / f"rank{rank}.json"
        self.data: dict = {}

    def case(self, name: str, fn):
        """Run one case; record what it returned or the error it raised (with its time)."""
        start = time.perf_counter()
        try:
            value = fn()
            self.data[name] = {"ok": True, "value": value, "seconds": time.perf_counter() - start}
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            self.data[name] = {"ok": False, "type": type(e).__name__, "message": str(e),
                               "seconds": time.perf_counter() - start,
                               "mro": [c.__name__ for c in type(e).__mro__]}
        self.write()

    def write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def write_checkpoints(folder: Path) -> Path:
    """The checkpoints the tests load, all from `source_model()`:

    vgg.safetensors; vgg.pth (DDP `module.` prefix, under "state_dict", with an epoch);
    sharded/ (a Hugging Face index over two shards); corrupt/ (the same, second shard cut
    short); unsafe.pth (pickles a fractions.Fraction, a global weights_only refuses and graft does
    not stand in for unasked).
    """
    from fractions import Fraction

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = expected_state()
    save_file(sd, folder / "vgg.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 5}, folder / "vgg.pth")
    torch.save({"state_dict": sd, "lr": Fraction(1, 10)}, folder / "unsafe.pth")
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name in ("sharded", "corrupt"):
        (folder / name).mkdir(exist_ok=True)
        weight_map = {}
        for file, ks in shards.items():
            save_file({k: sd[k] for k in ks}, folder / name / file)
            weight_map.update({k: file for k in ks})
        (folder / name / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    cut = folder / "corrupt" / "model-00002-of-00002.safetensors"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    return folder


# -- wrapper scripts ----------------------------------------------------------------------


def batches(rank: int, steps: int = 3, batch: int = 4):
    """Different data on each rank (as a DistributedSampler gives): only gradient
    averaging keeps the ranks' new blocks equal."""
    g = torch.Generator().manual_seed(7 + rank)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(steps)]


def full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (FSDP2 parameters are sharded DTensors)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def frozen_check(named_params, expected: dict) -> dict:
    """Frozen parameters against the checkpoint (bitwise), the new block's digest."""
    frozen, rnn3 = [], []
    differs = []
    for name, p in named_params:
        value = full(p).detach().cpu()
        name = name.removeprefix("module.")
        if not p.requires_grad:
            frozen.append(name)
            if not torch.equal(value, expected[name]):
                differs.append(name)
        if name.startswith("rnn3."):
            rnn3.append(value)
    return {"frozen": frozen, "frozen_differs": differs, "rnn3": digest(rnn3)}


def optimizer_check(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """Which parameters the optimizer holds and keeps state for: trainable ones only?"""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    with_state = {id(p) for p in optimizer.state}
    return {"groups_are_trainable": in_groups == trainable, "state_is_trainable": with_state == trainable,
            "frozen_in_optimizer": len((in_groups | with_state) & frozen), "n_trainable": len(trainable)}
