"""Under torchrun, 2 processes, run folder OUT on a 20 MB tmpfs the test mounted: a loop of its own
saves asynchronously (12.6 MB per checkpoint, half per rank) and trains on; the second save fails
in the background (disk full). Each rank writes OUT/../rank<r>.json: the step at which `stop()`
raised, and the error (its type and text).
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import graft

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Linear(1024, 1024)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ckpt = graft.Checkpointer(out, model=model, optimizer=opt, async_save=True, keep_last=1)
report = {"rank": rank, "step": None, "type": None, "error": None}
step = 0
try:
    with ckpt.preemption() as stop:
        while step < 10_000:
            model(torch.randn(4, 1024)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step in (1, 2):
                ckpt.save(epoch=step, step=step)
            if step == 1:
                ckpt.wait()  # the first one committed: the one that must survive
            stop()
            time.sleep(0.005)
except graft.GraftError as e:
    report.update(step=step, type=type(e).__name__, error=str(e))
finally:
    ckpt.close()
(out.parent / f"rank{rank}.json").write_text(json.dumps(report))
dist.barrier()
dist.destroy_process_group()
