"""Where checkpoints live when they are not local files: s3:// object storage (`graft.storage.s3`).

Importing this package needs nothing beyond graft itself; the client library (obstore, the
`[s3]` extra: `pip install 'torch-graft[s3]'`) is imported on the first use of an s3:// path,
and its absence is a `MissingExtraError` (a GraftError and an ImportError) naming the extra.
"""

from graft.storage.s3 import (
    MissingExtraError,
    S3File,
    S3Path,
    S3Stat,
    as_path,
    clear_caches,
    delete,
    is_remote,
    list_prefix,
    open_file,
    put_bytes,
    read_ranges,
    read_ranges_many,
    settings,
    upload_file,
    upload_tree,
)

__all__ = [
    "MissingExtraError",
    "S3File",
    "S3Path",
    "S3Stat",
    "as_path",
    "clear_caches",
    "delete",
    "is_remote",
    "list_prefix",
    "open_file",
    "put_bytes",
    "read_ranges",
    "read_ranges_many",
    "settings",
    "upload_file",
    "upload_tree",
]
