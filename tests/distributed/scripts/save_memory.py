"""Under torchrun (2 processes): what one sharded save costs each rank, measured.

    torchrun --nproc_per_node 2 save_memory.py OUT ddp|fsdp2 [MB]

A model of about MB megabytes of fp32 weights (default 160) takes one AdamW step, so the state
to save is about 3 x MB. Around the save each rank resets its peak RSS (/proc/self/clear_refs 5)
and also samples RssAnon every 2 ms (bench/procstats.py); it reports the growth of both over
the level before the save, and the bytes of its shard file. Rank 0 writes OUT/<mode>.json.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "bench"))  # procstats

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from graft.checkpointing import layout  # noqa: E402
from graft.checkpointing.save import save  # noqa: E402
from graft.checkpointing.shard_writer import STAGING_BYTES  # noqa: E402
from graft.checkpointing.torch_adapter import TorchAdapter  # noqa: E402
from procstats import PeakRss, status_kb  # noqa: E402

out, mode = Path(sys.argv[1]), sys.argv[2]
mb = float(sys.argv[3]) if len(sys.argv) > 3 else 160.0
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
width = 1024
layers = max(1, int(mb * 2**20 / 4 / (width * width)))
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
if mode == "fsdp2":
    from graft.wrapping import wrap_fsdp2

    model = wrap_fsdp2(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(torch.randn(4, width)).square().mean().backward()
if mode == "ddp":
    for p in model.parameters():
        dist.all_reduce(p.grad)
opt.step()
opt.zero_grad(set_to_none=True)
state_bytes = sum(h.nbytes for h in TorchAdapter(model, opt, mode).holdings())  # this rank holds
dist.barrier()

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS now
before = status_kb()
with PeakRss() as peak:
    result = save(out / mode, "epoch_000001", TorchAdapter(model, opt, mode))
after = status_kb()
mine = {"rank": rank, "hwm_growth": (after["VmHWM"] - before["VmRSS"]) * 1024, "anon_growth": peak.extra_anon,
        "samples": peak.samples, "held_bytes": state_bytes,
        "shard_bytes": (result.folder / layout.shard_file(rank)).stat().st_size}
everyone = [None] * world
dist.all_gather_object(everyone, mine)
if rank == 0:
    m = layout.read_manifest(result.folder)
    logical = sum(t.numel * t.dtype.itemsize for n, t in m.tensors.items() if not n.startswith(layout.RANK_PREFIX))
    (out / f"{mode}.json").write_text(json.dumps({"ranks": everyone, "bytes_per_rank": result.bytes_per_rank,
                                                  "logical_bytes": logical, "staging_bytes": STAGING_BYTES,
                                                  "seconds": result.seconds}, indent=1))
dist.barrier()
dist.destroy_process_group()
