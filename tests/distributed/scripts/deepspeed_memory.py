"""Peak memory of reading a ZeRO-3 checkpoint: graft against DeepSpeed's zero_to_fp32.

Not part of the test run (it trains a ~35M-parameter model); run by hand:

    torchrun --nproc_per_node 2 deepspeed_memory.py write OUT     # one ZeRO-3 step, saved
    python deepspeed_memory.py measure OUT graft                  # each in a fresh process
    python deepspeed_memory.py measure OUT zero_to_fp32

`measure` prints the model's size and the peak RSS above the process's RSS with the model
built, i.e. what the read itself costs.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from graft.models import VGG


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    model = VGG("vgg16", 1000, width=0.5, hidden=2048, pool=7, dropout=0.0)
    for p in model.features.parameters():  # the usual fine-tuning split: backbone frozen
        p.requires_grad_(False)
    return model


def write(out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    model = build()
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    loss = engine(torch.randn(2, 3, 32, 32)).sum()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out)
    dist.barrier()
    dist.destroy_process_group()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(folder: str, how: str) -> None:
    model = build()
    model_mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    base = current_mib()
    peak_before = peak_mib()  # if building the model peaked higher, the read's cost is hidden
    start = time.perf_counter()
    if how == "graft":
        import graft

        report = graft.load(model, folder, progress=False, verbose=False)
        assert not report.new and not report.mismatched
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(folder)
        model.load_state_dict(state)
        del state
    seconds = time.perf_counter() - start
    print(f"{how}: model {model_mib:.0f} MiB; RSS with model {base:.0f} MiB (peak so far {peak_before:.0f});"
          f" peak {peak_mib():.0f} MiB;"
          f" read cost {peak_mib() - base:.0f} MiB ({(peak_mib() - base) / model_mib:.2f}x model); {seconds:.1f} s")


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        measure(sys.argv[2], sys.argv[3])
