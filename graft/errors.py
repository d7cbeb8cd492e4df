"""The error policy of torch-graft.

User mistakes and bad files raise these (never a bare assert); each message names the
file or key, says what is wrong, and says the way out.
"""

from __future__ import annotations


class GraftError(Exception):
    """Base class of every error torch-graft raises on purpose."""


class CheckpointError(GraftError):
    """A checkpoint cannot be read: missing, unknown format, truncated, corrupt, unsafe."""

    def __init__(self, path: object, problem: str, way_out: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.way_out = way_out
        message = f"{self.path}: {problem}"
        if way_out:
            message += f"\n  way out: {way_out}"
        super().__init__(message)

    def __reduce__(self):
        # Lets the error cross process boundaries (broadcast from rank 0) unchanged.
        return (type(self), (self.path, self.problem, self.way_out))


class PlanError(GraftError, ValueError):
    """The checkpoint and the model cannot be matched as asked (collision, shape, dtype)."""


class ConfigError(GraftError, ValueError):
    """A run config (YAML file, override, or a field combination) is invalid; the message names the field."""


class RunDirError(GraftError):
    """The run folder (`train.out_dir`) cannot be used: not a folder, read-only, not writable, or locked.

    One line, always: `<folder>: <problem>; way out: <what to do>` (the trainer prints it as is).
    """

    def __init__(self, path: object, problem: str, way_out: str):
        self.path = str(path)
        self.problem = problem
        self.way_out = way_out
        super().__init__(f"{self.path}: {problem}; way out: {way_out}")

    def __reduce__(self):
        # Crosses process boundaries (rank 0's verdict is broadcast to every rank) unchanged.
        return (type(self), (self.path, self.problem, self.way_out))


class RunDirLocked(RunDirError):
    """Another trainer holds the run folder's lock (`RUN_DIR/.lock`); `owner` is its record (pid, host...)."""

    def __init__(self, path: object, problem: str, way_out: str, owner: dict | None = None):
        super().__init__(path, problem, way_out)
        self.owner = dict(owner or {})

    def __reduce__(self):
        return (type(self), (self.path, self.problem, self.way_out, self.owner))


class StorageError(RunDirError):
    """Writing a run checkpoint failed (disk full, quota, read-only remount...); the newest complete
    checkpoint is untouched and the half-written temporary folder was removed."""
