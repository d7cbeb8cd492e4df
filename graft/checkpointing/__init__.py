"""Run checkpoints: layout, writer, resume.

Modules: lock (one trainer per run folder: a kernel lock on RUN_DIR/.lock that dies with
its process, plus the owner's record for the message), faults (the run folder's OS errors
as one-line `graft.RunDirError` / `graft.StorageError`: the start probe, disk full during
a save).
"""
