"""Writer for tests/distributed/test_read_accelerate.py, run by
`accelerate launch --multi_gpu --num_processes 2 ... accelerate_save.py OUT`.

Two models are prepared and trained one step on 2 CPU processes (gloo), then:
OUT/state/          save_state: model.safetensors, model_1.safetensors, optimizer.bin, ...
OUT/state_bin/      save_state(safe_serialization=False): pytorch_model.bin, pytorch_model_1.bin
OUT/model_sharded/  save_model(model_a, max_shard_size=...): shards + model.safetensors.index.json
OUT/model_single/   save_model(model_b): one model.safetensors
OUT/final_a.safetensors, OUT/final_b.safetensors: each model's final weights, for comparison
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from graft.models import tiny_vgg

out = Path(sys.argv[1])
# cpu=True is what gives MULTI_CPU with gloo under `accelerate launch --multi_gpu` here.
accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2, accelerator.state
torch.manual_seed(0)
model_a = tiny_vgg(num_classes=5)
model_b = tiny_vgg(num_classes=5)  # same shapes, other values: picking the wrong index shows
optim = torch.optim.AdamW([*model_a.parameters(), *model_b.parameters()], lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1)
model_a, model_b, optim, sched = accelerator.prepare(model_a, model_b, optim, sched)

torch.manual_seed(1 + accelerator.process_index)
x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
loss = torch.nn.functional.cross_entropy(model_a(x), y) + torch.nn.functional.cross_entropy(model_b(x), y)
accelerator.backward(loss)
optim.step()
sched.step()

accelerator.save_state(out / "state")
accelerator.save_state(out / "state_bin", safe_serialization=False)
accelerator.save_model(model_a, out / "model_sharded", max_shard_size="40KB")
accelerator.save_model(model_b, out / "model_single")
if accelerator.is_main_process:
    for name, model in (("a", model_a), ("b", model_b)):
        sd = {k: v.detach().clone().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(sd, out / f"final_{name}.safetensors")
accelerator.wait_for_everyone()
accelerator.end_training()
