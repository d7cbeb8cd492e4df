"""One obstore store per bucket, and what graft knows of the bucket's objects.

A store (`Bucket`) is one `obstore.store.S3Store` (Rust `object_store` bindings; the `[s3]`
extra, imported here on first use, never when graft.storage is imported) with its caches:

- directory listings (one LIST per folder, with delimiter) and object infos (size, ETag,
  mtime) are fetched once and kept: a checkpoint's tree does not change during a load;
- fetched pieces of objects, LRU by bytes (`settings.cache_bytes`), shared by every S3File
  opened on the bucket, keyed by (key, ETag, size): the pieces of an object that was since
  replaced (new ETag) are not served for the new one.

`S3Path.refresh()` / `clear_caches()` forget them. The requests that change objects are
store methods too (`put`, `upload`, `delete`): each forgets what the caches held of the
objects it changed, so graft's own later reads see its writes.

Stores are made on the first use of a bucket and kept per (bucket, AWS_* environment,
client settings): a changed environment or client setting makes a new store.

Below the paths in the layering: functions here take `S3Path` values and never make one, so
that S3Path itself can use them.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from graft.errors import CheckpointError
from graft.storage.credentials import aws_setup
from graft.storage.failures import (
    MissingExtraError,
    classify,
    first_line,
    read_error,
    sleep_backoff,
    truncated,
    write_error,
)
from graft.storage.tuning import settings

if TYPE_CHECKING:  # annotations only: graft.storage.paths imports this module
    from graft.storage.paths import S3Path

EXTRA_HINT = "pip install 'torch-graft[s3]'"


def load_obstore():
    """The obstore module, or a MissingExtraError naming the extra to install."""
    try:
        import obstore
        import obstore.store  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(
            f"reading or writing s3:// paths needs the obstore package, which is not installed ({e});"
            f" way out: {EXTRA_HINT}") from e
    return obstore


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str | None
    mtime: float


class Listing:
    """One folder level: objects (name -> info) and sub-prefixes (names)."""

    __slots__ = ("files", "dirs")

    def __init__(self, files: dict[str, ObjectInfo], dirs: set[str]):
        self.files, self.dirs = files, dirs


def _info(meta: dict) -> ObjectInfo:
    modified = meta.get("last_modified")
    return ObjectInfo(int(meta["size"]), meta.get("e_tag"),
                      modified.timestamp() if hasattr(modified, "timestamp") else 0.0)


class Bucket:
    """One bucket's store and caches (listings, object infos, fetched file pieces)."""

    def __init__(self, name: str):
        self.name = name
        obstore = load_obstore()
        self.setup = aws_setup()
        client = {"timeout": timedelta(seconds=settings.request_timeout_s),
                  "connect_timeout": timedelta(seconds=settings.connect_timeout_s)}
        if self.setup.endpoint and self.setup.endpoint.lower().startswith("http://"):
            client["allow_http"] = True
        retry = {"max_retries": settings.client_retries,
                 "backoff": {"init_backoff": timedelta(seconds=min(settings.backoff_s, 1.0) / 2),
                             "max_backoff": timedelta(seconds=settings.max_backoff_s), "base": 2},
                 "retry_timeout": timedelta(seconds=max(settings.request_timeout_s, 60))}
        kwargs = dict(self.setup.config)
        if self.setup.credential_provider is not None:
            kwargs["credential_provider"] = self.setup.credential_provider
        try:
            self.store = obstore.store.S3Store(name, client_options=client, retry_config=retry, **kwargs)
        except Exception as e:  # noqa: BLE001 - obstore's configuration errors
            raise CheckpointError(f"s3://{name}", f"cannot set up an S3 client ({first_line(e)})",
                                  "check AWS_ENDPOINT_URL, AWS_REGION and the AWS_* variables") from e
        self.obs = obstore
        self.lock = threading.Lock()
        self.listings: dict[str, Listing | None] = {}
        self.infos: dict[str, ObjectInfo | None] = {}
        self.pieces = _Pieces()

    def forget(self, key: str | None = None) -> None:
        """Drop the caches (all, or what a write of `key` may have changed)."""
        with self.lock:
            if key is None:
                self.listings.clear()
                self.infos.clear()
                self.pieces = _Pieces()
                return
            self.infos.pop(key, None)
            self.pieces.drop(key)
            for prefix in [p for p in self.listings if not p or key.startswith(p + "/")]:
                del self.listings[prefix]

    # -- metadata ------------------------------------------------------------------------
    def listing(self, folder: S3Path) -> Listing | None:
        """The level under `folder` (None: the bucket does not exist); one LIST, then cached."""
        prefix = folder.key
        with self.lock:
            if prefix in self.listings:
                return self.listings[prefix]
        try:
            result = self.obs.list_with_delimiter(self.store, prefix or None)
        except Exception as e:  # noqa: BLE001
            if classify(e)[0] == "no-bucket":
                listing = None
            else:
                raise read_error(self, folder, e) from e
        else:
            cut = len(prefix) + 1 if prefix else 0
            files = {m["path"][cut:]: _info(m) for m in result["objects"] if m["path"][cut:]}
            dirs = {p[cut:].rstrip("/") for p in result["common_prefixes"]}
            listing = Listing(files, {d for d in dirs if d})
        with self.lock:
            self.listings[prefix] = listing
            if listing is not None:
                for name, info in listing.files.items():
                    self.infos[f"{prefix}/{name}" if prefix else name] = info
        return listing

    def known_dir(self, key: str) -> bool | None:
        """Whether `key/` holds objects, if the cached listing of its folder says (None: not cached)."""
        with self.lock:
            listing = self.listings.get(key)
            if listing is not None:
                return bool(listing.files or listing.dirs)
            parent = key.rsplit("/", 1)[0] if "/" in key else ""
            if parent in self.listings:
                above = self.listings[parent]
                return above is not None and key[len(parent) + 1 if parent else 0:] in above.dirs
        return None

    def object_info(self, path: S3Path) -> ObjectInfo | None:
        """Size and ETag of the object `path` (None: no such object); from a cached listing or one HEAD."""
        key = path.key
        if not key:
            return None
        with self.lock:
            if key in self.infos:
                return self.infos[key]
            parent = key.rsplit("/", 1)[0] if "/" in key else ""
            if parent in self.listings:
                listing = self.listings[parent]
                return None if listing is None else listing.files.get(key[len(parent) + 1 if parent else 0:])
        try:
            info = _info(self.obs.head(self.store, key))
        except Exception as e:  # noqa: BLE001
            if classify(e)[0] in ("missing", "no-bucket"):
                info = None
            else:
                raise read_error(self, path, e) from e
        with self.lock:
            self.infos[key] = info
        return info

    def bucket_exists(self, near: S3Path) -> bool:
        """Whether this bucket exists (a LIST of at most one key); `near`, a path in it, names an error."""
        try:
            next(iter(self.obs.list(self.store, None, chunk_size=1)), None)
            return True
        except Exception as e:  # noqa: BLE001
            if classify(e)[0] == "no-bucket":
                return False
            raise read_error(self, near.parents[-1] if near.key else near, e) from e  # s3://bucket itself

    # -- data ---------------------------------------------------------------------------------
    def fetch(self, path: S3Path, start: int, end: int, etag: str | None):
        """Bytes [start, end) of `path` (a buffer), with retries; a short answer is a truncation."""
        options: dict = {"range": (start, end)}
        if etag and settings.check_etag:
            options["if_match"] = etag
        tries = 0
        while True:
            tries += 1
            try:
                data = self.obs.get(self.store, path.key, options=options).bytes()
            except Exception as e:  # noqa: BLE001
                kind = classify(e)[0]
                if kind != "retry" or tries >= settings.attempts:
                    raise read_error(self, path, e, (start, end), tries) from e
                sleep_backoff(tries)
                continue
            if len(data) != end - start:
                raise truncated(path, (start, end), start + len(data))
            return data

    def cached(self, path: S3Path, info: ObjectInfo, pos: int) -> tuple[int, object] | None:
        """A fetched piece (start, buffer) of `path` holding byte `pos`, if one is kept."""
        with self.lock:
            return self.pieces.find((path.key, info.etag, info.size), pos)

    def keep(self, path: S3Path, info: ObjectInfo, start: int, data) -> None:
        with self.lock:
            self.pieces.add((path.key, info.etag, info.size), start, data, settings.cache_bytes)

    # -- writes (each forgets what it changed) --------------------------------------------------
    def put(self, path: S3Path, data) -> None:
        """Write `data` (bytes-like) as the object `path` (multipart above settings.upload_part_size)."""
        try:
            self.obs.put(self.store, path.key, data, chunk_size=_part_size(memoryview(data).nbytes),
                         max_concurrency=settings.concurrency)
        except Exception as e:  # noqa: BLE001
            raise write_error(self, path, e, "writing the object") from e
        finally:
            self.forget(path.key)

    def upload(self, path: S3Path, local_path: Path, size: int) -> None:
        """Upload the local file `local_path` (`size` bytes) as the object `path`, multipart with
        parallel parts above the part size."""
        try:
            self.obs.put(self.store, path.key, local_path, chunk_size=_part_size(size),
                         max_concurrency=settings.concurrency, use_multipart=size > _part_size(size))
        except Exception as e:  # noqa: BLE001
            raise write_error(self, path, e, f"uploading {local_path}") from e
        finally:
            self.forget(path.key)

    def delete(self, paths: list[S3Path]) -> None:
        """Delete objects of this bucket (a missing one is not an error), 1000 per request."""
        try:
            for i in range(0, len(paths), 1000):
                self.obs.delete(self.store, [p.key for p in paths[i:i + 1000]])
        except Exception as e:  # noqa: BLE001
            if classify(e)[0] != "missing":
                raise write_error(self, paths[0], e, f"deleting {len(paths)} object(s)") from e
        finally:
            for p in paths:
                self.forget(p.key)


def _part_size(total: int) -> int:
    # S3: parts of at least 5 MiB, at most 10,000 of them.
    return max(settings.upload_part_size, 5 << 20, math.ceil(total / 9_000))


class _Pieces:
    """Fetched pieces of objects, LRU by bytes: {(key, etag, size): [(start, buffer)...]}."""

    def __init__(self):
        self.by_object: dict[tuple, list[tuple[int, object]]] = {}
        self.order: OrderedDict[tuple, int] = OrderedDict()  # (object, start) -> nbytes
        self.total = 0

    def find(self, obj: tuple, pos: int) -> tuple[int, object] | None:
        for start, data in self.by_object.get(obj, ()):
            if start <= pos < start + len(data):
                self.order.move_to_end((obj, start))
                return start, data
        return None

    def add(self, obj: tuple, start: int, data, cap: int) -> None:
        if (obj, start) in self.order or not len(data):
            return
        self.by_object.setdefault(obj, []).append((start, data))
        self.order[(obj, start)] = len(data)
        self.total += len(data)
        while self.total > cap and len(self.order) > 1:
            (old, old_start), n = self.order.popitem(last=False)
            self.total -= n
            kept = [p for p in self.by_object[old] if p[0] != old_start]
            if kept:
                self.by_object[old] = kept
            else:
                del self.by_object[old]

    def drop(self, key: str) -> None:
        for obj in [o for o in self.by_object if o[0] == key]:
            for start, data in self.by_object.pop(obj):
                self.total -= self.order.pop((obj, start), 0)


# -- the stores of this process ---------------------------------------------------------------

_buckets: dict[tuple, Bucket] = {}
_buckets_lock = threading.Lock()


def _env_key() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def _client_key() -> tuple:
    """The settings baked into a store object (a change makes new stores)."""
    return (settings.client_retries, settings.backoff_s, settings.max_backoff_s,
            settings.request_timeout_s, settings.connect_timeout_s)


def _bucket(name: str) -> Bucket:
    """The store of bucket `name` for the current environment (a changed AWS_* env makes a new one)."""
    key = (name, _env_key(), _client_key())
    with _buckets_lock:
        found = _buckets.get(key)
    if found is not None:
        return found
    made = Bucket(name)
    with _buckets_lock:
        return _buckets.setdefault(key, made)


def store_for(path: S3Path) -> Bucket:
    """The store of the bucket that holds `path` (made on first use)."""
    return _bucket(path.bucket)


def clear_caches(stores: bool = False) -> None:
    """Forget every cached listing, size and file piece; `stores=True` also drops the clients."""
    with _buckets_lock:
        buckets = list(_buckets.values())
        if stores:
            _buckets.clear()
    for bucket in buckets:
        bucket.forget()


def open_stores() -> int:
    """How many bucket stores (S3 clients) this process holds: one per bucket and AWS_*
    environment, made on the first use of an s3:// path there, dropped by
    `clear_caches(stores=True)`. 0: nothing has used an s3:// path in this process (since the
    last such clear), so no request can have been made; a test asserts it of a rank that
    must never contact the store."""
    with _buckets_lock:
        return len(_buckets)
