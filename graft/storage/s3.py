"""Checkpoints on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2...).

Three layers, all over one `obstore` store per bucket (Rust `object_store` bindings; the
`[s3]` extra):

- `S3Path`: an `s3://bucket/key` value with the part of `pathlib.Path` checkpoint readers use
  (`/`, name, parent, suffix, exists, is_dir, iterdir, glob, stat, read_bytes, open("rb")).
  It is not a local path: it has no `__fspath__`, so `open(S3Path)` fails loudly instead of
  opening a file named "s3:/bucket/...". Directory listings (one LIST per folder, with
  delimiter) and object sizes are fetched once and kept per bucket: a checkpoint's tree does
  not change during a load. `refresh()` / `clear_caches()` forget them; graft's own writes
  forget what they touch.
- `open("rb")`: a seekable read-only file over range GETs with a read-ahead that adapts
  like the kernel's: a read at a new place fetches `settings.read_ahead_min` (64 KiB), each
  read that continues the previous one fetches 4x more, up to `settings.read_ahead_max`
  (4 MiB), and a read in the last window fetches the whole tail (a zip's central directory
  sits right before its end record). The pieces fetched are kept per bucket (LRU,
  `settings.cache_bytes`), so a parser's seek/read on metadata costs a few small requests;
  `S3File.prefetch(spans)` fetches many scattered small spans at once, in parallel (the local
  headers of a torch zip's records). A read of `settings.direct_read` bytes or more goes
  straight to `read_ranges`.
- `read_ranges(path, [(offset, nbytes, memoryview)])`: the bulk tensor reader. Ranges closer
  than `settings.merge_gap` are merged into one request, smallest gaps first, while the
  bytes fetched for nothing stay under `settings.max_waste` of the bytes wanted; merged
  ranges are cut into `settings.part_size` parts, `settings.concurrency` in flight; each
  part's bytes are copied once, from the client's response buffer into the destination
  memoryviews (obstore hands back one buffer per response; there is no API to receive
  into caller memory). Failures are retried (`settings.attempts`, exponential backoff with
  jitter) on top of obstore's own request retries; what cannot be read is a
  `CheckpointError` naming `s3://bucket/key` and the byte range.

Writers (`put_bytes`, `upload_file` (multipart, parallel parts), `upload_tree` (the commit
files last), `delete`, `list_prefix`) raise `graft.errors.StorageError` when S3 refuses.

Configuration comes from the standard places, nothing is hard-coded: AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE with ~/.aws/config and
~/.aws/credentials (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE), and obstore's own chain
(web identity, ECS/EKS container credentials, instance metadata). With boto3 importable,
a profile's credentials come from botocore (SSO, assume-role, credential_process...);
without it, static keys of the profile are read from the files. An http:// endpoint is
allowed (MinIO on a private network, the tests' moto server); requests are path-style
unless AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true.
"""

from __future__ import annotations

import configparser
import fnmatch
import io
import math
import os
import random
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePath
from typing import Callable, Iterable, Iterator, Sequence

from graft.errors import CheckpointError, GraftError, StorageError

SCHEME = "s3://"
EXTRA_HINT = "pip install 'torch-graft[s3]'"


class MissingExtraError(GraftError, ImportError):
    """An s3:// path was used but the client library of the `[s3]` extra is not installed."""


@dataclass
class Settings:
    """Tuning of the S3 layer; change the attributes of `graft.storage.s3.settings` to adjust."""

    concurrency: int = 8
    """Range requests (reads) and parts (uploads) in flight at once."""
    part_size: int = 8 << 20
    """Merged read ranges longer than this are cut into parts of this size, read in parallel."""
    merge_gap: int = 1 << 20
    """Two wanted ranges at most this far apart may be fetched as one request..."""
    max_waste: float = 0.04
    """...as long as the gap bytes fetched stay below this share of the bytes wanted."""
    read_ahead_min: int = 64 << 10
    """`S3Path.open()` files: the least fetched by a read at a new place (random access)..."""
    read_ahead_max: int = 4 << 20
    """...growing 4x per read that continues the previous one, up to this."""
    cache_bytes: int = 64 << 20
    """Fetched file pieces kept per bucket (LRU), shared by the files opened on it."""
    direct_read: int = 4 << 20
    """A file read at least this large bypasses the cache and goes to `read_ranges`."""
    upload_part_size: int = 16 << 20
    """Multipart upload part size (raised for huge files: S3 allows 10,000 parts)."""
    attempts: int = 3
    """Tries of each range read, each after obstore's own request retries are spent."""
    client_retries: int = 3
    """obstore's retries of one request (connection errors, 5xx, dropped responses)."""
    backoff_s: float = 0.25
    """First backoff between tries; doubled each try, with jitter, up to `max_backoff_s`."""
    max_backoff_s: float = 8.0
    request_timeout_s: float = 300.0
    """Whole-request limit (obstore's default, 30 s, is too short for large parts on slow links)."""
    connect_timeout_s: float = 10.0
    check_etag: bool = True
    """Range reads send If-Match with the ETag seen when the object was first stat'ed: an
    object replaced in the middle of a load fails loudly instead of mixing two versions."""


settings = Settings()


def _client_key() -> tuple:
    """The settings baked into a store object (a change makes new stores)."""
    return (settings.client_retries, settings.backoff_s, settings.max_backoff_s,
            settings.request_timeout_s, settings.connect_timeout_s)


# -- paths -------------------------------------------------------------------------------

_URL = re.compile(r"^[sS]3:/{1,2}([^/]+)/*(.*)$")


def is_remote(path: object) -> bool:
    """Whether `path` names an S3 object or prefix (an `S3Path`, or a string `s3://...`).

    A `pathlib.Path("s3://b/k")` (which pathlib collapses to "s3:/b/k") counts too, so a URL
    that went through Path() somewhere is still recognised.
    """
    if isinstance(path, S3Path):
        return True
    if isinstance(path, str):
        return path[:5].lower() == SCHEME
    if isinstance(path, PurePath):
        return str(path)[:4].lower() == "s3:/" and bool(_URL.match(str(path)))
    return False


def as_path(path: str | os.PathLike | S3Path) -> Path | S3Path:
    """An `S3Path` for a remote path, a `pathlib.Path` otherwise."""
    return S3Path(path) if is_remote(path) else Path(path)


def open_file(path: str | os.PathLike | S3Path, mode: str = "rb"):
    """`open(path, mode)` for local files, `S3Path(path).open(mode)` for s3:// (read modes only)."""
    if is_remote(path):
        return S3Path(path).open(mode)
    return open(path, mode)


def _norm_key(key: str) -> str:
    return "/".join(part for part in key.split("/") if part not in ("", "."))


@dataclass(frozen=True)
class S3Stat:
    """What `S3Path.stat()` knows of an object."""

    st_size: int
    st_mtime: float
    etag: str | None


class S3Path:
    """`s3://bucket/key`: a folder (prefix) or an object, with a pathlib-like API.

    Folders are prefixes: `is_dir()` is true when objects exist under `key/` (or, for the
    bucket itself, when the bucket exists). Nothing here is a local path (no `__fspath__`).
    """

    __slots__ = ("bucket", "key")

    def __init__(self, url: str | os.PathLike | S3Path):
        if isinstance(url, S3Path):
            self.bucket, self.key = url.bucket, url.key
            return
        text = str(url) if isinstance(url, PurePath) else url
        match = _URL.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not an s3:// URL: {url!r} (expected s3://bucket/key)")
        self.bucket, self.key = match[1], _norm_key(match[2])

    @classmethod
    def _make(cls, bucket: str, key: str) -> S3Path:
        path = object.__new__(cls)
        path.bucket, path.key = bucket, key
        return path

    # -- pure path operations -----------------------------------------------------------
    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and (self.bucket, self.key) == (other.bucket, other.key)

    def __lt__(self, other: S3Path) -> bool:
        return (self.bucket, self.key) < (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((S3Path, self.bucket, self.key))

    def __truediv__(self, other: str) -> S3Path:
        return self.joinpath(other)

    def joinpath(self, *others: str) -> S3Path:
        key = self.key
        for other in others:
            if isinstance(other, S3Path):
                raise TypeError(f"cannot join {other} under {self}")
            extra = _norm_key(str(other))
            key = f"{key}/{extra}" if key and extra else key or extra
        return S3Path._make(self.bucket, key)

    @property
    def url(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    @property
    def suffixes(self) -> list[str]:
        name = self.name
        if name.endswith("."):
            return []
        return ["." + s for s in name.lstrip(".").split(".")[1:]]

    @property
    def stem(self) -> str:
        name, suffix = self.name, self.suffix
        return name[: -len(suffix)] if suffix else name

    @property
    def parent(self) -> S3Path:
        return S3Path._make(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def parents(self) -> list[S3Path]:
        out, p = [], self
        while p.key:
            p = p.parent
            out.append(p)
        return out

    @property
    def parts(self) -> tuple[str, ...]:
        return (f"{SCHEME}{self.bucket}/", *(self.key.split("/") if self.key else ()))

    def with_name(self, name: str) -> S3Path:
        if not self.key:
            raise ValueError(f"{self} has an empty name")
        return self.parent / name

    def with_suffix(self, suffix: str) -> S3Path:
        return self.with_name(self.stem + suffix)

    def relative_to(self, other: S3Path) -> str:
        """The key of `self` below `other`, as a posix path string."""
        other = S3Path(other)
        if self.bucket == other.bucket and (not other.key or self.key == other.key
                                            or self.key.startswith(other.key + "/")):
            return self.key[len(other.key):].lstrip("/")
        raise ValueError(f"{self} is not under {other}")

    def is_relative_to(self, other: S3Path) -> bool:
        try:
            self.relative_to(other)
            return True
        except ValueError:
            return False

    def is_absolute(self) -> bool:
        return True

    def as_uri(self) -> str:
        return str(self)

    # -- queries (cached per bucket) ------------------------------------------------------
    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_file(self) -> bool:
        return _bucket(self.bucket).object_info(self) is not None

    def is_dir(self) -> bool:
        bucket = _bucket(self.bucket)
        if self.key:
            known = bucket.known_dir(self.key)
            if known is not None:
                return known
        listing = bucket.listing(self.key)
        if listing is None:
            return False
        return not self.key or bool(listing.files or listing.dirs)

    def iterdir(self) -> Iterator[S3Path]:
        """The objects and sub-prefixes right under this prefix, sorted by name."""
        listing = _bucket(self.bucket).listing(self.key)
        if listing is None:
            raise _bucket(self.bucket).missing_error(self, "is not a folder: its bucket does not exist")
        names = sorted(set(listing.files) | listing.dirs)
        if self.key and not names:
            raise _bucket(self.bucket).missing_error(self, "is not a folder: no object has this prefix")
        return iter([self / name for name in names])

    def glob(self, pattern: str) -> Iterator[S3Path]:
        """Names matching `pattern` (fnmatch, one level per `/`-separated segment; no `**`)."""
        segments = [s for s in pattern.split("/") if s not in ("", ".")]
        if any("**" in s for s in segments):
            raise ValueError(f"S3Path.glob does not support '**' (pattern {pattern!r})")
        found = [self]
        for i, segment in enumerate(segments):
            last = i == len(segments) - 1
            nxt = []
            for folder in found:
                listing = _bucket(folder.bucket).listing(folder.key)
                if listing is None:
                    continue
                names = set(listing.files) | listing.dirs if last else listing.dirs
                nxt.extend(folder / n for n in sorted(names) if fnmatch.fnmatchcase(n, segment))
            found = nxt
        return iter(found)

    def stat(self) -> S3Stat:
        bucket = _bucket(self.bucket)
        info = bucket.object_info(self)
        if info is None:
            raise bucket.missing_error(self)
        return S3Stat(info.size, info.mtime, info.etag)

    def refresh(self) -> S3Path:
        """Forget what is cached about this bucket (listings, sizes, blocks); returns self."""
        _bucket(self.bucket).forget()
        return self

    # -- data ---------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        info = self.stat()
        if info.st_size == 0:
            return b""
        out = bytearray(info.st_size)
        read_ranges(self, [(0, info.st_size, memoryview(out))])
        return bytes(out)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def open(self, mode: str = "rb", buffering: int = -1, encoding: str | None = None,
             errors: str | None = None, newline: str | None = None):
        """A seekable read-only file ("rb", or "r" for text). Writes go through put_bytes/upload_file."""
        if mode not in ("r", "rb", "rt"):
            raise ValueError(f"{self}: S3 objects open read-only ('rb' or 'r'), not {mode!r};"
                             " write with graft.storage.put_bytes or upload_file")
        raw = S3File(self)
        if mode == "rb":
            return raw
        return io.TextIOWrapper(io.BufferedReader(raw, settings.read_ahead_min), encoding=encoding or "utf-8",
                                errors=errors, newline=newline)

    # -- writes (convenience) -------------------------------------------------------------------
    def write_bytes(self, data) -> int:
        put_bytes(self, data)
        return memoryview(data).nbytes

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        put_bytes(self, text.encode(encoding))
        return len(text)

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.is_file():
            raise _bucket(self.bucket).missing_error(self)
        delete([self])

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: S3 folders exist as soon as an object is written under them."""


# -- the client ------------------------------------------------------------------------------

def _obstore():
    try:
        import obstore
        import obstore.store  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(
            f"reading or writing s3:// paths needs the obstore package, which is not installed ({e});"
            f" way out: {EXTRA_HINT}") from e
    return obstore


@dataclass(frozen=True)
class _AwsSetup:
    """Where the connection settings came from (for the store and for error messages)."""

    config: dict
    credential_provider: object
    endpoint: str | None
    region: str | None
    credentials_from: str

    def where(self) -> str:
        if self.endpoint:
            return f"endpoint {self.endpoint}"
        return f"AWS S3, region {self.region or 'us-east-1 (the default)'}"


def _profile_name() -> str:
    return os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"


def _read_ini(path: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path), encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        pass
    return parser


def _profile_values() -> tuple[dict, dict]:
    """The profile's section of ~/.aws/config and of ~/.aws/credentials (either may be empty)."""
    profile = _profile_name()
    config = _read_ini(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    creds = _read_ini(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))
    conf_section = "default" if profile == "default" else f"profile {profile}"
    conf = dict(config.items(conf_section)) if config.has_section(conf_section) else (
        dict(config.items(profile)) if config.has_section(profile) else {})
    cred = dict(creds.items(profile)) if creds.has_section(profile) else {}
    return conf, cred


def _nested(value: str | None, name: str) -> str | None:
    """`name = x` inside a nested config block (`s3 =\\n  endpoint_url = x`)."""
    for line in (value or "").splitlines():
        key, sep, val = line.partition("=")
        if sep and key.strip() == name:
            return val.strip()
    return None


class _BotoCredentials:
    """obstore credential provider over a botocore credential chain (refreshable credentials)."""

    def __init__(self, credentials):
        self.credentials = credentials

    def __call__(self) -> dict:
        frozen = self.credentials.get_frozen_credentials()
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token,
                "expires_at": datetime.now(timezone.utc) + timedelta(minutes=5)}


def _aws_setup() -> _AwsSetup:
    env = os.environ
    conf, cred = _profile_values()
    config: dict = {}
    ignore_configured = env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT")
    if not endpoint and not ignore_configured:
        endpoint = _nested(conf.get("s3"), "endpoint_url") or conf.get("endpoint_url")
        if endpoint:
            config["endpoint"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region and conf.get("region"):
        region = config["region"] = conf["region"]
    provider = None
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        source = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment"  # obstore reads them itself
    else:
        source = ""
        try:
            import botocore.session
        except ImportError:
            botocore = None
        if botocore is not None:
            try:
                session = botocore.session.Session(profile=env.get("AWS_PROFILE") or None)
                credentials = session.get_credentials()
            except Exception:  # noqa: BLE001 - a broken profile: fall through to the files
                credentials = None
            if credentials is not None:
                provider = _BotoCredentials(credentials)
                source = f"botocore's chain (profile {_profile_name()!r})"
        if provider is None:
            keys = cred if cred.get("aws_access_key_id") else conf
            if keys.get("aws_access_key_id") and keys.get("aws_secret_access_key"):
                config["access_key_id"] = keys["aws_access_key_id"]
                config["secret_access_key"] = keys["aws_secret_access_key"]
                if keys.get("aws_session_token"):
                    config["session_token"] = keys["aws_session_token"]
                source = f"profile {_profile_name()!r} of the AWS credential files"
        if not source:
            source = ("no credentials found (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/credentials);"
                      " obstore's chain: web identity, container, instance metadata")
    return _AwsSetup(config, provider, endpoint, region, source)


@dataclass(frozen=True)
class _ObjectInfo:
    size: int
    etag: str | None
    mtime: float


class _Listing:
    """One folder level: objects (name -> info) and sub-prefixes (names)."""

    __slots__ = ("files", "dirs")

    def __init__(self, files: dict[str, _ObjectInfo], dirs: set[str]):
        self.files, self.dirs = files, dirs


def _info(meta: dict) -> _ObjectInfo:
    modified = meta.get("last_modified")
    return _ObjectInfo(int(meta["size"]), meta.get("e_tag"),
                       modified.timestamp() if hasattr(modified, "timestamp") else 0.0)


class _Bucket:
    """One bucket's store and caches (listings, object infos, fetched file pieces)."""

    def __init__(self, name: str):
        self.name = name
        obstore = _obstore()
        self.setup = _aws_setup()
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
            raise CheckpointError(f"{SCHEME}{name}", f"cannot set up an S3 client ({_first_line(e)})",
                                  "check AWS_ENDPOINT_URL, AWS_REGION and the AWS_* variables") from e
        self.obs = obstore
        self.lock = threading.Lock()
        self.listings: dict[str, _Listing | None] = {}
        self.infos: dict[str, _ObjectInfo | None] = {}
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
    def listing(self, prefix: str) -> _Listing | None:
        """The level under `prefix` (None: the bucket does not exist); one LIST, then cached."""
        with self.lock:
            if prefix in self.listings:
                return self.listings[prefix]
        path = S3Path._make(self.name, prefix)
        try:
            result = self.obs.list_with_delimiter(self.store, prefix or None)
        except Exception as e:  # noqa: BLE001
            if _classify(e)[0] == "no-bucket":
                listing = None
            else:
                raise self.read_error(path, e) from e
        else:
            cut = len(prefix) + 1 if prefix else 0
            files = {m["path"][cut:]: _info(m) for m in result["objects"] if m["path"][cut:]}
            dirs = {p[cut:].rstrip("/") for p in result["common_prefixes"]}
            listing = _Listing(files, {d for d in dirs if d})
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

    def object_info(self, path: S3Path) -> _ObjectInfo | None:
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
            if _classify(e)[0] in ("missing", "no-bucket"):
                info = None
            else:
                raise self.read_error(path, e) from e
        with self.lock:
            self.infos[key] = info
        return info

    def bucket_exists(self) -> bool:
        try:
            next(iter(self.obs.list(self.store, None, chunk_size=1)), None)
            return True
        except Exception as e:  # noqa: BLE001
            if _classify(e)[0] == "no-bucket":
                return False
            raise self.read_error(S3Path._make(self.name, ""), e) from e

    def missing_error(self, path: S3Path, problem: str | None = None) -> CheckpointError:
        """The error for an object or folder that is not there: a missing bucket, or the names nearby."""
        if not self.bucket_exists():
            return CheckpointError(path, f"the bucket {self.name!r} does not exist ({self.setup.where()})",
                                   "check the bucket name, and that AWS_ENDPOINT_URL / AWS_REGION point"
                                   " at the storage that holds it")
        parent = path.parent
        try:
            chunk = next(iter(self.obs.list(self.store, parent.key or None, chunk_size=50)), [])
        except Exception:  # noqa: BLE001 - the names are only a hint
            chunk = []
        cut = len(parent.key) + 1 if parent.key else 0
        near = sorted({m["path"][cut:].split("/")[0] for m in chunk})[:10]
        hint = f"; under {parent}: {', '.join(near)}" if near else f"; nothing is stored under {parent}"
        return CheckpointError(path, problem or "no such object", f"check the path{hint}")

    # -- errors ----------------------------------------------------------------------------
    def read_error(self, path: S3Path, e: BaseException, span: tuple[int, int] | None = None,
                   tries: int = 1) -> CheckpointError:
        kind, detail = _classify(e)
        where = f" bytes [{span[0]}, {span[1]})" if span else ""
        if kind == "missing":
            return self.missing_error(path)
        if kind == "no-bucket":
            return CheckpointError(path, f"the bucket {self.name!r} does not exist ({self.setup.where()})",
                                   "check the bucket name, and that AWS_ENDPOINT_URL / AWS_REGION point"
                                   " at the storage that holds it")
        if kind in ("denied", "credentials"):
            detail = self.why_denied(path, e, detail)
            return CheckpointError(path, f"access denied{' reading' + where if where else ''}: {detail}",
                                   f"check the credentials (graft used {self.setup.credentials_from})"
                                   f" and that they may read this bucket ({self.setup.where()});"
                                   " set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if kind == "truncated":
            return _truncated(path, span, None)
        if kind == "changed":
            return CheckpointError(path, f"was replaced while graft was reading it (ETag changed;{where})",
                                   "wait for the writer to finish, then load again")
        if kind == "region":
            return CheckpointError(path, f"is in another region than the one used ({detail})",
                                   "set AWS_REGION to the bucket's region")
        if kind == "retry":
            return CheckpointError(path, f"cannot be read:{where} failed {tries} time(s), each after"
                                         f" {settings.client_retries} client retries ({detail})",
                                   f"check the network and the endpoint ({self.setup.where()}); graft"
                                   f" retries {settings.attempts} times with backoff"
                                   " (graft.storage.s3.settings.attempts)")
        return CheckpointError(path, f"cannot be read:{where} the server refused ({detail})",
                               f"check the path, the credentials and the endpoint ({self.setup.where()})")

    def why_denied(self, path: S3Path, e: BaseException, detail: str) -> str:
        """S3's reason (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied...) for a refusal.

        A refused HEAD has no body to say why; one 1-byte GET of the same object (refused for
        the same reason) carries the error document.
        """
        if "<Code>" in str(e) or not path.key:
            return detail
        try:
            self.obs.get(self.store, path.key, options={"range": (0, 1)}).bytes()
        except Exception as again:  # noqa: BLE001
            kind, why = _classify(again)
            if kind in ("denied", "credentials"):
                return why
        return detail

    def write_error(self, path: S3Path, e: BaseException, doing: str) -> StorageError:
        kind, detail = _classify(e)
        if kind == "no-bucket":
            return StorageError(path, f"{doing} failed: the bucket {self.name!r} does not exist",
                                f"create it, or check the bucket name and {self.setup.where()}")
        if kind in ("denied", "credentials"):
            if "<Code>" not in str(e) and path.key:
                detail = self.why_denied(path, e, detail)
            return StorageError(path, f"{doing} failed: access denied ({detail})",
                                f"check the credentials (graft used {self.setup.credentials_from}) and that they"
                                " may write this bucket")
        return StorageError(path, f"{doing} failed ({detail})",
                            f"check the network, the endpoint ({self.setup.where()}) and free quota;"
                            " then save again")

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
                kind = _classify(e)[0]
                if kind != "retry" or tries >= settings.attempts:
                    raise self.read_error(path, e, (start, end), tries) from e
                _sleep_backoff(tries)
                continue
            if len(data) != end - start:
                raise _truncated(path, (start, end), start + len(data))
            return data

    def cached(self, path: S3Path, info: _ObjectInfo, pos: int) -> tuple[int, object] | None:
        """A fetched piece (start, buffer) of `path` holding byte `pos`, if one is kept."""
        with self.lock:
            return self.pieces.find((path.key, info.etag, info.size), pos)

    def keep(self, path: S3Path, info: _ObjectInfo, start: int, data) -> None:
        with self.lock:
            self.pieces.add((path.key, info.etag, info.size), start, data, settings.cache_bytes)


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


def _truncated(path: S3Path, span: tuple[int, int] | None, got_to: int | None) -> CheckpointError:
    where = f"bytes [{span[0]}, {span[1]})" if span else "bytes past its end"
    have = f" but the object ends at byte {got_to}" if got_to is not None else " but the object is shorter"
    return CheckpointError(path, f"truncated: needs {where}{have}",
                           "the object was cut short (interrupted upload or copy); upload it again")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {line[:300]}"


def _classify(e: BaseException) -> tuple[str, str]:
    """(kind, one-line detail) of an obstore error.

    kinds: missing, no-bucket, denied, credentials, truncated, changed, region, retry
    (connection errors, dropped responses, timeouts, 5xx), refused (another 4xx).
    """
    text = str(e)
    code_match = re.search(r"<Code>([^<]+)</Code>", text)
    code = code_match[1] if code_match else ""
    status_match = re.search(r"status code: (\d{3})", text)
    status = int(status_match[1]) if status_match else 0
    detail = _first_line(e) if not code else f"{code}, HTTP {status or '?'}"
    name = type(e).__name__
    if code == "NoSuchBucket":
        return "no-bucket", detail
    if isinstance(e, FileNotFoundError) or code == "NoSuchKey" or status == 404:
        return "missing", detail
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "TokenRefreshRequired",
                "InvalidToken"):
        return "credentials", detail
    if name in ("PermissionDeniedError", "UnauthenticatedError") or status in (401, 403):
        return "denied", detail
    if status == 416 or code == "InvalidRange":
        return "truncated", detail
    if name == "PreconditionError" or status == 412:
        return "changed", detail
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException") \
            or status in (301, 307):
        return "region", detail
    if 400 <= status < 500 and status not in (408, 429):
        return "refused", detail
    if "credential" in text.lower() and status == 0 and "HTTP error" not in text:
        return "credentials", _first_line(e)
    if name in ("InvalidPathError", "NotSupportedError", "UnknownConfigurationKeyError", "AlreadyExistsError"):
        return "refused", detail
    return "retry", detail


def _sleep_backoff(tries: int) -> None:
    delay = min(settings.max_backoff_s, settings.backoff_s * 2 ** (tries - 1))
    time.sleep(delay * (0.5 + random.random() / 2))


# -- stores ----------------------------------------------------------------------------------

_buckets: dict[tuple, _Bucket] = {}
_buckets_lock = threading.Lock()


def _env_key() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def _bucket(name: str) -> _Bucket:
    """The store of bucket `name` for the current environment (a changed AWS_* env makes a new one)."""
    key = (name, _env_key(), _client_key())
    with _buckets_lock:
        found = _buckets.get(key)
    if found is not None:
        return found
    made = _Bucket(name)
    with _buckets_lock:
        return _buckets.setdefault(key, made)


def clear_caches(stores: bool = False) -> None:
    """Forget every cached listing, size and file piece; `stores=True` also drops the clients."""
    with _buckets_lock:
        buckets = list(_buckets.values())
        if stores:
            _buckets.clear()
    for bucket in buckets:
        bucket.forget()


# -- the file object ---------------------------------------------------------------------------

class S3File(io.RawIOBase):
    """A read-only, seekable file over one S3 object: range GETs with adaptive read-ahead,
    the pieces fetched kept per bucket (see the module docstring)."""

    def __init__(self, path: S3Path):
        super().__init__()
        self.path = S3Path(path)
        self._bucket = _bucket(self.path.bucket)
        info = self._bucket.object_info(self.path)
        if info is None:
            raise self._bucket.missing_error(self.path)
        self._info = info
        self._pos = 0
        self._window = settings.read_ahead_min
        self._last_end: int | None = None

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def size(self) -> int:
        return self._info.size

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed file {self.path}")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._info.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._info.size - self._pos))
        if n == 0:
            return 0
        start = self._pos
        if n >= settings.direct_read:
            _read_items(self._bucket, self.path, self._info, [(start, n, view[:n])], None)
        else:
            sequential = start == self._last_end
            done = 0
            while done < n:
                at = start + done
                piece = self._bucket.cached(self.path, self._info, at)
                if piece is None:
                    if sequential:
                        self._window = min(self._window * 4, max(settings.read_ahead_max, settings.read_ahead_min))
                    else:
                        self._window = settings.read_ahead_min
                    want = max(n - done, self._window)
                    end = min(self._info.size, at + want)
                    # A jump into the last window fetches the whole tail; a scan reaching it does not
                    # fetch again what it just read.
                    first = at if sequential else max(0, min(at, end - want))
                    sequential = True  # the rest of this read continues what was just fetched
                    data = self._bucket.fetch(self.path, first, end, self._info.etag)
                    self._bucket.keep(self.path, self._info, first, data)
                    piece = (first, data)
                piece_start, data = piece
                inner = at - piece_start
                take = min(n - done, len(data) - inner)
                view[done:done + take] = memoryview(data)[inner:inner + take]
                done += take
        self._pos += n
        self._last_end = self._pos
        return n

    def prefetch(self, spans: Iterable[tuple[int, int]]) -> int:
        """Fetch many (offset, nbytes) spans at once (merged when within `read_ahead_min` of each
        other, `settings.concurrency` requests in flight) and keep them, so that the reads which
        follow (a parser walking scattered small headers) cost no request. Returns bytes fetched."""
        self._check_open()
        wanted = sorted((o, min(o + n, self._info.size)) for o, n in spans if n > 0 and o < self._info.size)
        if not wanted:
            return 0
        merged = [list(wanted[0])]
        for a, b in wanted[1:]:
            if a - merged[-1][1] <= settings.read_ahead_min:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        todo = [(a, b) for a, b in merged if self._bucket.cached(self.path, self._info, a) is None
                or self._bucket.cached(self.path, self._info, b - 1) is None]

        def get(span: tuple[int, int]) -> int:
            data = self._bucket.fetch(self.path, span[0], span[1], self._info.etag)
            self._bucket.keep(self.path, self._info, span[0], data)
            return len(data)

        if len(todo) <= 1 or settings.concurrency <= 1:
            return sum(get(span) for span in todo)
        with ThreadPoolExecutor(min(settings.concurrency, len(todo)), thread_name_prefix="graft-s3") as pool:
            return sum(pool.map(get, todo))

    def read(self, size: int = -1) -> bytes:
        self._check_open()
        if size is None or size < 0:
            size = max(0, self._info.size - self._pos)
        out = bytearray(max(0, min(size, self._info.size - self._pos)))
        n = self.readinto(out)
        return bytes(out[:n]) if n != len(out) else bytes(out)

    def readall(self) -> bytes:
        return self.read(-1)

    def __repr__(self) -> str:
        return f"<S3File {self.path} size={self._info.size}>"


# -- bulk range reads ------------------------------------------------------------------------


def _plan(items: Sequence[tuple[int, int, memoryview]]) -> list[tuple[int, int, list]]:
    """Merge sorted items into requests [(start, end, items)]: smallest gaps first, under the budget."""
    items = sorted(items, key=lambda it: it[0])
    if not items:
        return []
    wanted = sum(n for _, n, _ in items)
    budget = settings.max_waste * wanted
    ends, end = [], 0
    for offset, nbytes, _ in items:
        end = max(end, offset + nbytes)
        ends.append(end)
    gaps = sorted((items[i + 1][0] - ends[i], i) for i in range(len(items) - 1))
    join = [False] * len(items)
    spent = 0
    for gap, i in gaps:
        if gap <= 0:
            join[i] = True
        elif gap <= settings.merge_gap and spent + gap <= budget:
            join[i] = True
            spent += gap
    requests, group = [], [items[0]]
    start, stop = items[0][0], items[0][0] + items[0][1]
    for i in range(1, len(items)):
        if join[i - 1]:
            group.append(items[i])
            stop = max(stop, items[i][0] + items[i][1])
        else:
            requests.append((start, stop, group))
            group, start, stop = [items[i]], items[i][0], items[i][0] + items[i][1]
    requests.append((start, stop, group))
    return requests


def _parts(requests: list[tuple[int, int, list]]) -> list[tuple[int, int, list]]:
    """Cut requests into parts of at most part_size; each part lists the (object offset, view) it fills."""
    size = max(settings.part_size, 1 << 16)
    parts = []
    for start, stop, group in requests:
        for p0 in range(start, stop, size):
            p1 = min(stop, p0 + size)
            pieces = []
            for offset, nbytes, view in group:
                a, b = max(offset, p0), min(offset + nbytes, p1)
                if a < b:
                    pieces.append((a, view[a - offset:b - offset]))
            if pieces:
                parts.append((p0, p1, pieces))
    return parts


def _check_items(path: S3Path, info: _ObjectInfo, items) -> list[tuple[int, int, memoryview]]:
    out = []
    for offset, nbytes, view in items:
        view = memoryview(view)
        if view.readonly:
            raise ValueError(f"{path}: the destination of bytes [{offset}, {offset + nbytes}) is read-only")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if len(view) != nbytes or offset < 0:
            raise ValueError(f"{path}: a destination of {len(view)} bytes for bytes [{offset}, {offset + nbytes})")
        if nbytes == 0:
            continue
        if offset + nbytes > info.size:
            raise _truncated(path, (offset, offset + nbytes), info.size)
        out.append((offset, nbytes, view))
    return out


def _read_items(bucket: _Bucket, path: S3Path, info: _ObjectInfo, items, on_bytes) -> int:
    return _run_parts([(bucket, path, info, part) for part in _parts(_plan(items))], on_bytes)


def _run_parts(jobs: list, on_bytes: Callable[[int], None] | None) -> int:
    """Fetch every part (concurrency at most settings.concurrency); returns bytes fetched.

    Returns or raises only when no part is still being written into its destinations.
    """
    lock = threading.Lock()
    failed = threading.Event()

    def run(job) -> int:
        bucket, path, info, (p0, p1, pieces) = job
        if failed.is_set():
            return 0
        data = memoryview(bucket.fetch(path, p0, p1, info.etag))
        for at, view in pieces:
            view[:] = data[at - p0:at - p0 + len(view)]
            if on_bytes is not None:
                with lock:
                    on_bytes(len(view))
        return p1 - p0

    if not jobs:
        return 0
    if len(jobs) == 1 or settings.concurrency <= 1:
        return sum(run(job) for job in jobs)
    with ThreadPoolExecutor(min(settings.concurrency, len(jobs)), thread_name_prefix="graft-s3") as pool:
        futures = [pool.submit(run, job) for job in jobs]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        error = next((f.exception() for f in done if f.exception() is not None), None)
        if error is not None:
            failed.set()
            for f in pending:
                f.cancel()
            wait(futures)  # the parts already running finish before the caller's memory is released
            raise error
    return sum(f.result() for f in futures)


def read_ranges(path: str | S3Path, items: Iterable[tuple[int, int, memoryview]],
                on_bytes: Callable[[int], None] | None = None) -> int:
    """Read bytes [offset, offset + nbytes) of the object `path` into each writable memoryview.

    Near ranges are merged (gap <= settings.merge_gap, gap bytes <= settings.max_waste of the
    wanted bytes), long ones cut into settings.part_size parts, settings.concurrency requests
    in flight. `on_bytes(n)` is called (from reader threads, serialized) as wanted bytes land.
    Returns the bytes fetched from the server (wanted bytes plus merged gaps).

    Every range is checked against the object's size first: a range past its end is a
    CheckpointError ("truncated") before any byte is written. A read that keeps failing is a
    CheckpointError naming the object and the byte range, after settings.attempts tries.
    """
    return read_ranges_many([(path, items)], on_bytes)


def read_ranges_many(requests: Iterable[tuple[str | S3Path, Iterable[tuple[int, int, memoryview]]]],
                     on_bytes: Callable[[int], None] | None = None) -> int:
    """`read_ranges` over several objects at once, sharing one pool (shards of one checkpoint)."""
    jobs = []
    for path, items in requests:
        path = S3Path(path)
        bucket = _bucket(path.bucket)
        info = bucket.object_info(path)
        if info is None:
            raise bucket.missing_error(path)
        checked = _check_items(path, info, items)
        jobs.extend((bucket, path, info, part) for part in _parts(_plan(checked)))
    return _run_parts(jobs, on_bytes)


# -- writes --------------------------------------------------------------------------------------

def put_bytes(path: str | S3Path, data) -> None:
    """Write `data` (bytes-like) as the object `path` (multipart above settings.upload_part_size)."""
    path = S3Path(path)
    bucket = _bucket(path.bucket)
    try:
        bucket.obs.put(bucket.store, path.key, data, chunk_size=_part_size(memoryview(data).nbytes),
                       max_concurrency=settings.concurrency)
    except Exception as e:  # noqa: BLE001
        raise bucket.write_error(path, e, "writing the object") from e
    finally:
        bucket.forget(path.key)


def _part_size(total: int) -> int:
    # S3: parts of at least 5 MiB, at most 10,000 of them.
    return max(settings.upload_part_size, 5 << 20, math.ceil(total / 9_000))


def upload_file(local_path: str | os.PathLike, path: str | S3Path) -> int:
    """Upload a local file as the object `path`: multipart with parallel parts above the part size.

    The object appears whole or not at all (S3 completes a multipart upload atomically).
    Returns the bytes uploaded.
    """
    path = S3Path(path)
    local_path = Path(local_path)
    bucket = _bucket(path.bucket)
    size = local_path.stat().st_size
    try:
        bucket.obs.put(bucket.store, path.key, local_path, chunk_size=_part_size(size),
                       max_concurrency=settings.concurrency, use_multipart=size > _part_size(size))
    except Exception as e:  # noqa: BLE001
        raise bucket.write_error(path, e, f"uploading {local_path}") from e
    finally:
        bucket.forget(path.key)
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
    for name, group in by_bucket.items():
        bucket = _bucket(name)
        try:
            for i in range(0, len(group), 1000):
                bucket.obs.delete(bucket.store, [p.key for p in group[i:i + 1000]])
        except Exception as e:  # noqa: BLE001
            if _classify(e)[0] != "missing":
                raise bucket.write_error(group[0], e, f"deleting {len(group)} object(s)") from e
        finally:
            for p in group:
                bucket.forget(p.key)


def list_prefix(path: str | S3Path) -> list[tuple[S3Path, int]]:
    """Every object under the prefix `path` (recursive), with its size, sorted; always a fresh LIST."""
    path = S3Path(path)
    bucket = _bucket(path.bucket)
    try:
        metas = [m for chunk in bucket.obs.list(bucket.store, path.key or None, chunk_size=1000) for m in chunk]
    except Exception as e:  # noqa: BLE001
        raise bucket.read_error(path, e) from e
    return sorted((S3Path._make(path.bucket, m["path"]), int(m["size"])) for m in metas)
