"""Run checkpoints: the one owner of their format, the sharded writer and the elastic restore.

    layout          names (folders, files, logical tensors), the manifest, "complete", discovery
    slices          Holding + StateAdapter: what a rank holds of each logical tensor
    shard_writer    streaming safetensors writer (from live memory, hashed while written)
    atomic          temp folder, manifest last, rename; rotation; leftovers (on S3: staged
                    uploads, the manifest object as the commit)
    save            the sharded save (every rank its own file, rank 0 commits)
    restore         every rank reads only the ranges it needs, straight into live state
    module_state    a module's weights as holdings (plain tensors, FSDP2 DTensors)
    optimizer_state a torch optimizer's state by parameter name (created before a restore)
    torch_adapter   the adapter for one process, DDP and FSDP2
    codec           non-tensor state as JSON, without pickle
    lock            one trainer per run folder: a kernel lock on RUN_DIR/.lock that dies with
                    its process, plus the owner's record for the message (on S3: a lease)
    faults          the run folder's OS errors as one-line `graft.RunDirError` /
                    `graft.StorageError`: the start probe, disk full during a save

This package imports nothing at import time: `graft.loading` imports `layout` from here.
"""
