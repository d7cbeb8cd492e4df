"""2 ranks (torchrun, gloo): load an s3:// checkpoint with strategy="broadcast" where only rank 0
holds credentials; every rank must end with the file's values. argv: URL LOCAL_COPY."""

import os
import sys

# Rank 1 has no credentials and no endpoint at all: it must never touch the store.
if os.environ.get("RANK") != "0":
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import graft  # noqa: E402


class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(256, 256, bias=False) for _ in range(4))


def main():
    url, local = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = Layers()
    report = graft.load(model, url, verbose=False, progress=False)
    assert len(report.plan.loaded) == 4, report.plan.loaded
    truth = load_file(local)
    for k, v in model.state_dict().items():
        assert torch.equal(v, truth[k]), (rank, k)
    if rank != 0:
        assert graft.storage.open_stores() == 0, "rank 1 opened a connection to the store"
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
