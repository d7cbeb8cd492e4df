"""Every RNG of a process, saved and restored; and the policy across world sizes.

At the world size that saved, every rank gets its own generators back exactly
(`restore_rng`). At another world size there is no "own" state to give a rank, so each rank's
generators are seeded afresh from (seed, global step, rank) (`derive_rng`), and the caller
logs that it did so: never a silent mix of other ranks' states.
"""

from __future__ import annotations

import random

import torch


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states as (JSON-able dict, tensors): python, numpy, torch, cuda."""
    py = random.getstate()
    meta: dict = {"python": [py[0], list(py[1]), py[2]]}
    tensors = {"torch": torch.get_rng_state().clone()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [kind, pos, has_gauss, cached]
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s.clone()
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put back what `capture_rng` took (on the same rank)."""
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    torch.set_rng_state(tensors["torch"])
    if "numpy" in meta:
        import numpy as np

        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, cached))
    cuda = sorted(k for k in tensors if k.startswith("cuda"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


RNG_POLICY_SAME = "restored"
RNG_POLICY_DERIVED = "derived"


def derive_rng(seed: int, step: int, rank: int) -> int:
    """Seed python, numpy, torch (and CUDA) of this rank from (seed, global step, rank); returns the seed."""
    import hashlib

    digest = hashlib.sha256(f"graft-rng|{seed}|{step}|{rank}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little") % (2**63)
    random.seed(derived)
    torch.manual_seed(derived)  # also every CUDA device
    try:
        import numpy as np

        np.random.seed(derived % 2**32)
    except ImportError:
        pass
    return derived
