"""Rank-aware logging: by default only the main process (global rank 0) speaks."""

from __future__ import annotations

import logging
import os


def global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    # Launchers set RANK before the process group exists; respect it so early logs stay quiet.
    return int(os.environ.get("RANK", "0"))


class RankAdapter(logging.LoggerAdapter):
    """`log.info(msg)` on rank 0 only; `log.info(msg, all_ranks=True)` everywhere, prefixed."""

    def log(self, level, msg, *args, all_ranks: bool = False, **kwargs):
        if not self.isEnabledFor(level):
            return
        rank = global_rank()
        if all_ranks:
            self.logger.log(level, f"[rank {rank}] {msg}", *args, **kwargs)
        elif rank == 0:
            self.logger.log(level, msg, *args, **kwargs)

    def debug(self, msg, *args, **kwargs):
        self.log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg, *args, **kwargs):
        self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg, *args, **kwargs):
        self.log(logging.WARNING, msg, *args, **kwargs)

    def error(self, msg, *args, **kwargs):
        self.log(logging.ERROR, msg, *args, **kwargs)


def get_logger(name: str) -> RankAdapter:
    return RankAdapter(logging.getLogger(name), {})


def progress(total: int | None, desc: str, unit: str = "B", enabled: bool = True):
    """A tqdm bar on rank 0 only (a disabled bar elsewhere, so callers need no branches)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not enabled or global_rank() != 0,
        leave=False,
        dynamic_ncols=True,
    )
