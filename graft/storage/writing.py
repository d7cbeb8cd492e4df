"""Writing to s3://: `put_bytes`, `upload_file` (multipart, parallel parts), `upload_tree` (the
commit files last), `delete`, and `list_prefix` (a fresh recursive LIST, for the writers that
clean up). The writes raise `graft.errors.StorageError` when S3 refuses; `list_prefix`, a
read, raises `CheckpointError`.

Here: resolving URLs, the order of an upload, grouping deletes by bucket. The requests
themselves are methods of the bucket's store (graft.storage.stores), which forgets what it
held of the objects written; S3Path.write_bytes and unlink use those methods directly.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterable, Sequence

from graft.storage.failures import classify, read_error, write_error
from graft.storage.paths import S3Path
from graft.storage.stores import store_for
from graft.storage.tuning import settings


def put_bytes(path: str | S3Path, data) -> None:
    """Write `data` (bytes-like) as the object `path` (multipart above settings.upload_part_size)."""
    path = S3Path(path)
    store_for(path).put(path, data)


class PreconditionFailed(Exception):
    """A conditional put found the object present (`if_absent`) or changed (`if_match`)."""


class ConditionalWritesUnsupported(Exception):
    """The store refuses conditional writes (some S3-compatible stores have none)."""


def put_if(path: str | S3Path, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
    """Write `data` as `path` only if no object is there (`if_absent`) or the object there still
    has ETag `if_match`; returns the new ETag. The primitive for a lock on a store without
    locks: two writers cannot both succeed. Raises PreconditionFailed when the condition does
    not hold, ConditionalWritesUnsupported when the store has no such writes, and StorageError
    for any other refusal."""
    if if_absent == (if_match is not None):
        raise ValueError("put_if: give exactly one of if_absent=True or if_match=<etag>")
    path = S3Path(path)
    bucket = store_for(path)
    try:
        result = bucket.obs.put(bucket.store, path.key, data, mode="create" if if_absent else {"e_tag": if_match})
    except Exception as e:  # noqa: BLE001 - obstore's errors, sorted below
        if classify(e)[0] in ("changed", "missing") or type(e).__name__ == "AlreadyExistsError":
            raise PreconditionFailed(str(path)) from e
        if "NotImplemented" in str(e) or "status code: 501" in str(e) or type(e).__name__ == "NotImplementedError":
            raise ConditionalWritesUnsupported(str(e)) from e
        raise write_error(bucket, path, e, "a conditional write") from e
    finally:
        bucket.forget(path.key)
    return result["e_tag"]


def upload_file(local_path: str | os.PathLike, path: str | S3Path) -> int:
    """Upload a local file as the object `path`: multipart with parallel parts above the part size.

    The object appears whole or not at all (S3 completes a multipart upload atomically).
    Returns the bytes uploaded.
    """
    path = S3Path(path)
    local_path = Path(local_path)
    bucket = store_for(path)
    size = local_path.stat().st_size
    bucket.upload(path, local_path, size)
    return size


def upload_tree(local_dir: str | os.PathLike, path: str | S3Path,
                last: Sequence[str] = ("manifest.json",)) -> list[S3Path]:
    """Upload every file under `local_dir` to the prefix `path`, the files named in `last`
    (relative paths, in that order) only after all others succeeded: the commit of a run
    checkpoint is its manifest, so a reader never sees a manifest without its files."""
    local_dir, path = Path(local_dir), S3Path(path)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    rel = {p.relative_to(local_dir).as_posix(): p for p in files}
    commit = [name for name in last if name in rel]
    body = [name for name in rel if name not in commit]
    done = []
    workers = max(1, min(len(body), max(1, settings.concurrency // 2)))
    if body:
        with ThreadPoolExecutor(workers, thread_name_prefix="graft-s3-up") as pool:
            futures = {pool.submit(upload_file, rel[name], path / name): name for name in body}
            wait(futures)
            for future, name in futures.items():
                future.result()  # the first failure raises (the commit files are not written)
                done.append(path / name)
    for name in commit:
        upload_file(rel[name], path / name)
        done.append(path / name)
    return done


def delete(paths: Iterable[str | S3Path]) -> None:
    """Delete objects (a missing one is not an error); bulk requests per bucket."""
    by_bucket: dict[str, list[S3Path]] = {}
    for p in paths:
        p = S3Path(p)
        by_bucket.setdefault(p.bucket, []).append(p)
    for group in by_bucket.values():
        store_for(group[0]).delete(group)


def list_prefix(path: str | S3Path) -> list[tuple[S3Path, int]]:
    """Every object under the prefix `path` (recursive), with its size, sorted; always a fresh LIST."""
    path = S3Path(path)
    bucket = store_for(path)
    try:
        metas = [m for chunk in bucket.obs.list(bucket.store, path.key or None, chunk_size=1000) for m in chunk]
    except Exception as e:  # noqa: BLE001
        raise read_error(bucket, path, e) from e
    # _make keeps each key exactly as stored (S3Path(url) would normalise "a//b" to "a/b").
    return sorted((S3Path._make(path.bucket, m["path"]), int(m["size"])) for m in metas)
