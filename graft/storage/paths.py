"""`s3://bucket/key` as a path: the `S3Path` value and the `S3File` its `open("rb")` returns.

- `S3Path`: an `s3://bucket/key` value with the part of `pathlib.Path` checkpoint readers use
  (`/`, name, parent, suffix, exists, is_dir, iterdir, glob, stat, read_bytes, open("rb")).
  It is not a local path: it has no `__fspath__`, so `open(S3Path)` fails loudly instead of
  opening a file named "s3:/bucket/...". Directory listings and object sizes come from the
  bucket's store (graft.storage.stores), fetched once and kept; `refresh()` forgets them.
- `S3File`: a seekable read-only file over range GETs with a read-ahead that adapts like the
  kernel's: a read at a new place fetches `settings.read_ahead_min` (64 KiB), each read that
  continues the previous one fetches 4x more, up to `settings.read_ahead_max` (4 MiB), and a
  read in the last window fetches the whole tail (a zip's central directory sits right before
  its end record). The pieces fetched are kept per bucket (LRU, `settings.cache_bytes`), so a
  parser's seek/read on metadata costs a few small requests; `S3File.prefetch(spans)` fetches
  many scattered small spans at once, in parallel (the local headers of a torch zip's
  records). A read of `settings.direct_read` bytes or more goes straight to the bulk range
  reader (graft.storage.ranges).

Both in one module because each makes the other: `S3Path.open` returns an S3File, and
`S3File(url)` resolves its URL into an S3Path. What they use (the stores, the range reader,
the failures) sits below and takes S3Path values without making them; the public functions
that take URLs (graft.storage.reading, graft.storage.writing) sit above.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable, Iterator

from graft.storage.failures import missing_error
from graft.storage.ranges import read_items, read_objects
from graft.storage.stores import store_for
from graft.storage.tuning import settings

SCHEME = "s3://"

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
        return store_for(self).object_info(self) is not None

    def is_dir(self) -> bool:
        bucket = store_for(self)
        if self.key:
            known = bucket.known_dir(self.key)
            if known is not None:
                return known
        listing = bucket.listing(self)
        if listing is None:
            return False
        return not self.key or bool(listing.files or listing.dirs)

    def iterdir(self) -> Iterator[S3Path]:
        """The objects and sub-prefixes right under this prefix, sorted by name."""
        bucket = store_for(self)
        listing = bucket.listing(self)
        if listing is None:
            raise missing_error(bucket, self, "is not a folder: its bucket does not exist")
        names = sorted(set(listing.files) | listing.dirs)
        if self.key and not names:
            raise missing_error(bucket, self, "is not a folder: no object has this prefix")
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
                listing = store_for(folder).listing(folder)
                if listing is None:
                    continue
                names = set(listing.files) | listing.dirs if last else listing.dirs
                nxt.extend(folder / n for n in sorted(names) if fnmatch.fnmatchcase(n, segment))
            found = nxt
        return iter(found)

    def stat(self) -> S3Stat:
        bucket = store_for(self)
        info = bucket.object_info(self)
        if info is None:
            raise missing_error(bucket, self)
        return S3Stat(info.size, info.mtime, info.etag)

    def refresh(self) -> S3Path:
        """Forget what is cached about this bucket (listings, sizes, blocks); returns self."""
        store_for(self).forget()
        return self

    # -- data ---------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        info = self.stat()
        if info.st_size == 0:
            return b""
        out = bytearray(info.st_size)
        read_objects([(self, [(0, info.st_size, memoryview(out))])])
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
        store_for(self).put(self, data)
        return memoryview(data).nbytes

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        store_for(self).put(self, text.encode(encoding))
        return len(text)

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.is_file():
            raise missing_error(store_for(self), self)
        store_for(self).delete([self])

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: S3 folders exist as soon as an object is written under them."""


# -- the file object ---------------------------------------------------------------------------

class S3File(io.RawIOBase):
    """A read-only, seekable file over one S3 object: range GETs with adaptive read-ahead,
    the pieces fetched kept per bucket (see the module docstring)."""

    def __init__(self, path: S3Path):
        super().__init__()
        self.path = S3Path(path)
        self._bucket = store_for(self.path)
        info = self._bucket.object_info(self.path)
        if info is None:
            raise missing_error(self._bucket, self.path)
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
            read_items(self._bucket, self.path, self._info, [(start, n, view[:n])], None)
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
