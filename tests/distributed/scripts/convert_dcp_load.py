"""Reader side of tests/distributed/test_convert_real.py: DCP folders written by `graft convert`
(one process) are loaded with torch's own `dcp.load` into an FSDP2-sharded model on 2 ranks
(gloo, CPU): another world size than the converter's, and every parameter split over ranks.

Run: `torchrun --nproc_per_node 2 convert_dcp_load.py SPEC.json`. SPEC lists cases
{"dcp": folder, "dcp_key": "model" or null, "batch_norm": bool, "out": file}; for each,
rank 0 writes the model's full state after the load to "out" (safetensors) for the test
to compare with the source, or the traceback to "out".error.
"""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from graft.models import tiny_vgg

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for case in json.loads(Path(sys.argv[1]).read_text()):
    try:
        torch.manual_seed(1234)  # other values than the source: a tensor the load misses shows
        model = tiny_vgg(num_classes=5, batch_norm=case["batch_norm"])
        for block in (model.features, model.classifier):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = get_model_state_dict(model)
        dcp.load({case["dcp_key"]: state} if case["dcp_key"] else state, checkpoint_id=case["dcp"])
        set_model_state_dict(model, state)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, case["out"])
    except BaseException:  # noqa: BLE001 - written for the test to show, the other cases still run
        Path(case["out"] + f".rank{rank}.error").write_text(traceback.format_exc())
    dist.barrier()
dist.destroy_process_group()
