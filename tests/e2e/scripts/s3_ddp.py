"""Run under torchrun (2 processes, gloo): a DDP run saving to s3://, resumed from it, and a save
whose upload fails on one rank only.

    torchrun --nproc_per_node 2 s3_ddp.py OUT s3://bucket/run DEAD_ENDPOINT

1. the straight run, 2 epochs, in OUT/straight (local disk);
2. the same run on S3: 1 epoch (train.session_epochs=1), then resumed to 2 (--resume auto);
3. a graft.Checkpointer on s3://bucket/fail: one good save, then a save where rank 1's
   AWS_ENDPOINT_URL points at DEAD_ENDPOINT (nothing listens there) so its upload fails; every
   rank writes what it raised to OUT/fail_rank<r>.json.
The test compares the checkpoints and reads the files.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (run_helpers)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import graft  # noqa: E402
from graft.trainer import run  # noqa: E402
from run_helpers import tiny_config  # noqa: E402

out, url, dead = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
straight = run(tiny_config(out / "straight", "train.epochs=2"))
first = run(tiny_config(url, "train.epochs=2", "train.session_epochs=1"))
second = run(tiny_config(url, "train.epochs=2"), resume="auto")
rank = dist.get_rank()
if rank == 0:
    (out / "summaries.json").write_text(json.dumps({"straight": straight, "first": first, "second": second},
                                                   default=str))

# A failed upload on one rank: the same StorageError on every rank, no manifest.
fail_url = url.rsplit("/", 1)[0] + "/fail"
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(256, 256))
ckpt = graft.Checkpointer(fail_url, model=model)
ckpt.save(epoch=1, step=1)
if rank == 1:
    os.environ["AWS_ENDPOINT_URL"] = dead  # graft.storage makes a new client for a changed AWS_* env
    from graft.storage import settings

    settings.client_retries = 1
    settings.backoff_s = 0.01
error = None
try:
    ckpt.save(epoch=2, step=2)
except graft.GraftError as e:
    error = {"type": type(e).__name__, "message": str(e)}
(out / f"fail_rank{rank}.json").write_text(json.dumps(error))
dist.barrier()
ckpt.close()
dist.destroy_process_group()
