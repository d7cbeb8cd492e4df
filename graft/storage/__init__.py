"""Where checkpoints live when they are not local files: s3:// object storage.

AWS S3 and the S3-compatible stores (MinIO, Ceph RGW, R2...) through one `obstore` store per
bucket. Importing this package needs nothing beyond graft itself; the client library
(obstore, the `[s3]` extra: `pip install 'torch-graft[s3]'`) is imported on the first use of
an s3:// path, and its absence is a `MissingExtraError` (a GraftError and an ImportError)
naming the extra.

The public face is this module; behind it, from the bottom up (each imports only those
above it in this list):

- `tuning`: `Settings`, the one `settings` object every layer reads;
- `credentials`: endpoint, region and credentials from AWS_* and the ~/.aws files;
- `failures`: what goes wrong (missing, denied, truncated, replaced...), the retry backoff,
  and the errors that say where and the way out;
- `stores`: one store per bucket with its caches (listings, object infos, fetched pieces);
- `ranges`: bulk range reads, merged, cut into parts, fetched in parallel;
- `paths`: `S3Path` (a pathlib-like value) and `S3File` (the seekable file it opens);
- `reading`: `read_ranges`, `read_ranges_many`; `writing`: `put_bytes`, `upload_file`,
  `upload_tree`, `delete`, `list_prefix`.

The layers under `paths` take S3Path values and never make one, so that S3Path's own reads
and writes can use them; the functions that take URL strings sit above `paths`.
"""

from graft.storage.failures import MissingExtraError
from graft.storage.paths import S3File, S3Path, S3Stat, as_path, is_remote, open_file
from graft.storage.reading import read_ranges, read_ranges_many
from graft.storage.stores import clear_caches, open_stores
from graft.storage.tuning import settings
from graft.storage.writing import (
    ConditionalWritesUnsupported, PreconditionFailed, delete, list_prefix, put_bytes, put_if, upload_file, upload_tree,
)

__all__ = [
    "ConditionalWritesUnsupported",
    "PreconditionFailed",
    "put_if",
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
    "open_stores",
    "put_bytes",
    "read_ranges",
    "read_ranges_many",
    "settings",
    "upload_file",
    "upload_tree",
]
