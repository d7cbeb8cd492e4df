"""Writer for tests/distributed/test_read_dcp.py: FSDP2 on 2 CPU ranks trains one step and
saves with `dcp.save` in the layouts users meet. Run under `torchrun --nproc_per_node 2`.

OUT/top/     model keys at the top level beside optimizer, lr_scheduler, train_state
             (torchtitan's current layout)
OUT/nested/  the model nested under "model", the optimizer under "optimizer"
OUT/single/  one process, no process group, the full state dict (one chunk per tensor)
OUT/final.safetensors  the full final weights, written by rank 0, for comparison
OUT/rank1_loaded.safetensors  a changed model loaded from OUT/nested with graft.load on
             both ranks (rank 0 reads, broadcasts), as rank 1 got it
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from graft.models import tiny_vgg

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
# 5 classes: the head's rows do not split evenly over 2 ranks, so FSDP2 pads one shard.
model = tiny_vgg(num_classes=5)
mesh = init_device_mesh("cpu", (2,))
for block in (model.features, model.classifier):
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1)

torch.manual_seed(1 + rank)
x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
torch.nn.functional.cross_entropy(model(x), y).backward()
optim.step()
sched.step()

model_sd, optim_sd = get_state_dict(model, optim)
top = {**model_sd, "optimizer": optim_sd, "lr_scheduler": sched.state_dict(),
       "train_state": {"step": torch.tensor(1)}}
dcp.save(top, checkpoint_id=out / "top")
dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=out / "nested")

full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    full = {k: v.contiguous() for k, v in full.items()}
    save_file(full, out / "final.safetensors")
    dcp.save(full, checkpoint_id=out / "single", no_dist=True)
dist.barrier()

# The reader under a live process group: graft.load on every rank, rank 0 reads the DCP
# folder and sends the tensors. Rank 1 writes what it got; a failure is written, not
# raised, so the tests of the saved folders above still run.
import traceback  # noqa: E402

import graft  # noqa: E402
from graft.models import tiny_vgg_rnn3  # noqa: E402

try:
    changed = tiny_vgg_rnn3(num_classes=7)
    report = graft.load(changed, out / "nested", freeze="loaded", verbose=False, progress=False)
    if rank == 1:
        save_file({k: v.contiguous() for k, v in changed.state_dict().items()}, out / "rank1_loaded.safetensors")
        (out / "rank1_report.txt").write_text(" ".join(sorted(report.new)))
except Exception:  # noqa: BLE001
    (out / f"rank{rank}_load_error.txt").write_text(traceback.format_exc())
dist.barrier()
dist.destroy_process_group()
