"""Learning-rate schedules as pure functions of the global step, and what extending a run does to them.

The schedule keeps no running state that could drift: the LR of step `s` is computed from
`s` and a list of phases. A run starts with one phase whose curve spans [0, total steps).
Raising `train.epochs` on resume appends a phase at the extension step, by policy:

- continue: the old curve goes on unchanged as a function of the step; past its old end
  it holds its final value (a step schedule keeps decaying every `step_epochs`).
- restart:  a new curve, warm-up included, from the extension step to the new end (a warm
  restart: the LR jumps back to its peak).
- stretch:  the curve is recomputed for the new horizon, as if the run had been configured
  with it from the start; the steps already taken keep the LR they had, and from the
  extension step on the LR follows the longer curve (a cosine at 500 of 1000 is at its
  midpoint, so the LR jumps up to that value).

The state (phases) is plain JSON, saved in every run checkpoint.
"""

from __future__ import annotations

import math

from graft.config import EXTEND_POLICIES, SCHEDULES, ScheduleConfig
from graft.errors import ConfigError


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name={name!r}; use one of {list(SCHEDULES)}")


class Schedule:
    """Sets each optimizer group's LR to base_lr x factor(step) before every step."""

    def __init__(self, cfg: ScheduleConfig, base_lrs: list[float], steps_per_epoch: int, total_steps: int):
        # ScheduleConfig checks its name, but a config changed after it was built is only
        # caught here: at construction, not at the first step of a long run.
        _check_name(cfg.name)
        self.cfg = cfg
        self.base_lrs = [float(x) for x in base_lrs]
        self.steps_per_epoch = steps_per_epoch
        self.phases: list[dict] = [{"start": 0, "curve_start": 0, "curve_end": total_steps, "policy": "initial"}]

    @property
    def total_steps(self) -> int:
        """The run's current horizon in steps."""
        return self.phases[-1].get("horizon", self.phases[-1]["curve_end"])

    def phase_at(self, step: int) -> dict:
        current = self.phases[0]
        for ph in self.phases:
            if ph["start"] <= step:
                current = ph
        return current

    def factor(self, step: int) -> float:
        ph = self.phase_at(step)
        c, e = ph["curve_start"], ph["curve_end"]
        cfg = self.cfg
        since = step - c
        if since < cfg.warmup_steps:
            return (since + 1) / cfg.warmup_steps
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** (since // (cfg.step_epochs * self.steps_per_epoch))
        span = max(1, e - c - cfg.warmup_steps)
        p = min(1.0, max(0.0, (since - cfg.warmup_steps) / span))
        m = cfg.min_lr_ratio
        if cfg.name == "cosine":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
        if cfg.name == "linear":
            return 1 - (1 - m) * p
        _check_name(cfg.name)  # changed since __init__: the same error
        raise NotImplementedError(f"schedule {cfg.name!r} is listed in SCHEDULES but has no curve here")

    def lrs(self, step: int) -> list[float]:
        f = self.factor(step)
        return [b * f for b in self.base_lrs]

    def apply(self, optimizer, step: int) -> float:
        """Write the LRs of `step` into the optimizer's groups; returns the first group's."""
        lrs = self.lrs(step)
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        return lrs[0]

    def extend(self, at_step: int, new_total: int, policy: str) -> dict:
        """Append the phase that `policy` gives a run extended at `at_step` to `new_total` steps."""
        if policy not in EXTEND_POLICIES:
            raise ValueError(f"schedule.on_extend={policy!r}; use one of {list(EXTEND_POLICIES)}")
        last = self.phases[-1]
        if policy == "continue":
            ph = {"start": at_step, "curve_start": last["curve_start"], "curve_end": last["curve_end"]}
        elif policy == "restart":
            ph = {"start": at_step, "curve_start": at_step, "curve_end": new_total}
        else:  # stretch: the latest curve's origin, the new end
            ph = {"start": at_step, "curve_start": last["curve_start"], "curve_end": new_total}
        before = self.lrs(at_step)[0]
        ph.update(policy=policy, horizon=new_total)
        self.phases.append(ph)
        after = self.lrs(at_step)[0]
        return {"policy": policy, "at_step": at_step, "new_total_steps": new_total,
                "lr_before": before, "lr_after": after}

    def state_dict(self) -> dict:
        return {"name": self.cfg.name, "base_lrs": self.base_lrs, "steps_per_epoch": self.steps_per_epoch,
                "phases": [dict(p) for p in self.phases]}

    require_same_steps_per_epoch = True
    """load_state_dict refuses a checkpoint whose epochs had another number of steps (at the same
    world size that means the data or batch size changed); the trainer lifts it at another world
    size, where epochs have other step counts by nature and the saved curve (a function of the
    global step) is kept as it was."""

    def load_state_dict(self, state: dict) -> None:
        """Put the saved state back exactly (see require_same_steps_per_epoch)."""
        if state["steps_per_epoch"] != self.steps_per_epoch and self.require_same_steps_per_epoch:
            raise ConfigError(f"the checkpoint's schedule has {state['steps_per_epoch']} steps per epoch, this run "
                              f"{self.steps_per_epoch}: the data or batch size changed")
        self.steps_per_epoch = state["steps_per_epoch"]
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.phases = [dict(p) for p in state["phases"]]
