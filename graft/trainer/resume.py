"""The trainer's part of resuming: is the config still the run's?

Finding, checking and restoring the checkpoint is `graft.Checkpointer`'s (the public API a
user's own loop has too): `Checkpointer.find` picks it (rank 0: newest complete, hashes
checked), `Checkpointer.resume` restores weights, optimizer, schedule, data position, counters
and RNG. What only the trainer knows is its config schema: which changes a resumed run may make.
"""

from __future__ import annotations

from graft._logging import get_logger
from graft.checkpointing.checkpointer import ResumePoint
from graft.config import SAFE_ON_RESUME, RunConfig, diff
from graft.errors import ConfigError

log = get_logger("graft.trainer")


def check_config(point: ResumePoint, cfg: RunConfig, allow: bool) -> dict:
    """The config changes since the checkpoint; unsafe ones refused unless `allow`."""
    changed = diff(point.saved_config, cfg.to_dict())
    unsafe = {k: v for k, v in changed.items() if k not in SAFE_ON_RESUME}
    if unsafe:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        if not allow:
            raise ConfigError(
                f"the config differs from the checkpoint's ({point.folder}) in {lines}. A resumed run may "
                f"change only {sorted(SAFE_ON_RESUME)}; pass --allow-config-change (allow_config_change=True) "
                f"to resume anyway (the result is no longer the run that never stopped)")
        log.warning("config changed on resume (allowed): %s", lines)
    return {k: list(v) for k, v in changed.items()}
