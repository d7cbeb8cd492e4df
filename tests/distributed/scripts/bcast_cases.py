"""The broadcast cases, all in one process group (one launch): torchrun --nproc_per_node 2.

    bcast_cases.py CKPT_DIR OUT_DIR

Rank 0 is given the real paths; every other rank a folder that does not exist, so any
file access there would fail. Each case's outcome (values, digests, report, or the error)
lands in OUT_DIR/rank{r}.json for the test to compare across ranks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from bcast_common import (
    Results,
    changed_model,
    expected_state,
    init_gloo,
    loaded_bitwise_equal,
    state_digest,
)

import graft
from graft.errors import CheckpointError
from graft.loading.formats.safetensors_file import SafetensorsFile

ckpt_dir, out_dir = Path(sys.argv[1]), sys.argv[2]
rank, world = init_gloo()
res = Results(out_dir, rank)
expected = expected_state()


def path(name: str) -> str:
    """The real path on rank 0; a folder that does not exist on the other ranks."""
    return str(ckpt_dir / name) if rank == 0 else f"/nonexistent/rank{rank}/{name}"


def summary(model, report) -> dict:
    return {
        "differs_from_checkpoint": loaded_bitwise_equal(model, expected, report),
        "rnn3": state_digest(model, "rnn3."),
        "all": state_digest(model),
        "report": report.to_dict(),
        "frozen": report.frozen,
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
    }


def basic(bucket_mb):
    def run():
        model = changed_model(rank)
        report = graft.load(model, path("vgg.safetensors"), freeze="loaded", bucket_mb=bucket_mb, verbose=False)
        return summary(model, report)
    return run


res.case("small_buckets", basic(0.01))  # ~5 KB buckets: tensors split across many buckets
res.case("one_bucket", basic(64))


def torch_prefixed():
    model = changed_model(rank)
    report = graft.load(model, path("vgg.pth"), freeze="loaded", bucket_mb=0.01, verbose=False)
    return summary(model, report)


res.case("torch_prefixed", torch_prefixed)


def hf_index():
    model = changed_model(rank)
    report = graft.load(model, path("sharded"), freeze="loaded", verbose=False)
    return summary(model, report)


res.case("hf_index", hf_index)


def meta():
    # Rank 0 holds a real model; the others build theirs on the meta device (no memory),
    # with a tied module and a non-persistent buffer, both of which must arrive too.
    if rank == 0:
        model = changed_model(rank)
    else:
        with torch.device("meta"):
            model = changed_model(rank)
    model.tied = model.classifier[6]
    model.register_buffer("scale", torch.full((5,), 2.0 + rank, device=model.classifier[6].weight.device),
                          persistent=False)
    report = graft.load(model, path("vgg.safetensors"), freeze="loaded", bucket_mb=0.01, verbose=False)
    out = summary(model, report)
    out["scale"] = model.scale.tolist()
    out["tied_is_same"] = model.tied.weight is model.classifier[6].weight
    out["devices"] = sorted({str(t.device) for t in model.state_dict().values()})
    return out


res.case("meta", meta)


def cast_and_overlap():
    # float64 model (a cast on every rank) with a 12-class head: the head's overlap is
    # copied on rank 0 and every rank gets rank 0's whole head.
    model = changed_model(rank, num_classes=12).double()
    report = graft.load(model, path("vgg.safetensors"), on_mismatch="copy-overlap", bucket_mb=0.01,
                        verbose=False)
    same = [n for n in report.loaded
            if torch.equal(model.state_dict()[n], expected[n].double())]
    head = model.classifier[6].weight.detach()
    return {"loaded_equal": len(same) == len(report.loaded), "partial": report.partial,
            "head": state_digest(model, "classifier.6."),
            "overlap_ok": torch.equal(head[:10], expected["classifier.6.weight"].double()),
            "all": state_digest(model)}


res.case("cast_and_overlap", cast_and_overlap)


def differs():
    model = changed_model(rank, num_classes=10 if rank == 0 else 12)
    graft.load(model, path("vgg.safetensors"), verbose=False)


res.case("differs", differs)


def missing():
    graft.load(changed_model(rank), path("no-such-file.safetensors"), verbose=False)


res.case("missing", missing)


def unsafe():
    graft.load(changed_model(rank), path("unsafe.pth"), verbose=False)


res.case("unsafe", unsafe)


def corrupt_shard():
    graft.load(changed_model(rank), path("corrupt"), verbose=False)


res.case("corrupt_shard", corrupt_shard)


class FlakyStorage(SafetensorsFile):
    """A reader whose storage fails half way (as a flaky network mount does): the error
    comes after the plan and the checks, while buckets are already flowing."""

    fail_key = "classifier.6.weight"

    def span(self, key):
        return None if key == self.fail_key else super().span(key)

    def _materialize(self, key):
        raise CheckpointError(self.path, f"I/O error while reading {key!r}", "check the storage and retry")


def read_fails():
    model = changed_model(rank)
    ckpt = FlakyStorage(ckpt_dir / "vgg.safetensors", graft.loading.formats.OpenOptions()) if rank == 0 else None
    graft.load(model, ckpt, bucket_mb=0.002, verbose=False)


res.case("read_fails", read_fails)
res.case("after_failure", basic(0.01))  # the process group still works after the failures


def every_rank():
    model = changed_model(rank)
    report = graft.load(model, str(ckpt_dir / "vgg.safetensors"), freeze="loaded", strategy="every-rank",
                        verbose=False)
    return summary(model, report)


res.case("every_rank", every_rank)


def every_rank_missing():
    graft.load(changed_model(rank), path("vgg.safetensors"), strategy="every-rank", verbose=False)


res.case("every_rank_missing", every_rank_missing)


def args_differ():
    graft.load(changed_model(rank), path("vgg.safetensors"), bucket_mb=1 + rank, verbose=False)


res.case("args_differ", args_differ)


def not_distributed():
    model = changed_model(rank)
    report = graft.load(model, str(ckpt_dir / "vgg.safetensors"), distributed=False, verbose=False)
    return summary(model, report)


res.case("not_distributed", not_distributed)
res.data["done"] = time.time()
res.write()
torch.distributed.destroy_process_group()
