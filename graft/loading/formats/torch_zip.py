"""The one reader of `torch.save`'s zip archives: every record located and checked once.

A torch archive is a zip of STORED records under one folder: `<name>/data.pkl` (the pickle
of the saved object), one `<name>/data/<key>` per storage (its raw bytes) and a few small
records (`version`, `byteorder`, ...). torch itself, unpickling onto the meta device,
*computes* where each storage starts from the layout its own writer produces; an archive
written any other way (re-packed by Python's `zipfile`, a different zip tool) then points
every storage but the first at the wrong bytes. So nothing here is computed from an assumed
layout: each record's data offset comes from its own local header, cross-checked with the
central directory, and each storage the pickle names is checked against its record (exact
length) and each tensor against its storage (view inside it), before any byte is read.

Every fault of the untrusted structure (zip directory, headers, pickle, sizes) is a
`CheckpointError` naming the file, the problem and the way out. The pickle is read with
torch's `weights_only` unpickler (`trust_pickle=True` is the only way to plain pickle), so
no code from the file runs, and all tensors come back on the meta device, their storages
tagged with the byte range that holds them (`stored(t)`); `span_of` and `read_tensor`
turn that into bytes. Archives may sit inside a larger file (a DCP `.distcp` file holds one
per chunk): `start` and `length` give the window.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.errors import CheckpointError
from graft.loading.formats.reading import Span, writable_buffer
from graft.storage import S3Path, as_path, is_remote, open_file, read_ranges

MAGIC = b"PK\x03\x04"
CORRUPT = "the file is corrupt or truncated; write or copy it again"
# torch reads archive format versions 1..10 (caffe2/serialize/versions.h) and refuses others.
_MIN_VERSION, _MAX_VERSION = 1, 10
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header
_U32 = 0xFFFFFFFF
_SMALL_RECORD = 1 << 20  # version, byteorder...: bytes, never megabytes
# General-purpose flags a plain stored record may carry: compression options (ignored when
# stored), a data descriptor after the data, UTF-8 names. Encryption, patch data and masked
# headers are refused (torch refuses them too).
_FLAGS_OK = 0x0002 | 0x0004 | 0x0008 | 0x0800


@dataclass(frozen=True)
class Record:
    """One zip member: its data is `size` bytes at absolute `offset` of the file."""

    name: str
    offset: int
    size: int
    crc: int


@dataclass(frozen=True)
class Stored:
    """Where a (meta) storage's bytes are: `nbytes` at absolute `offset` of `file`."""

    file: str
    offset: int
    nbytes: int
    key: str
    big_endian: bool


def is_archive(path: Path) -> bool:
    """A zip archive (torch >= 1.6) rather than the legacy pickle stream: by its first bytes,
    as torch decides."""
    with open_file(path) as f:
        return f.read(4) == MAGIC


class Archive:
    """A torch zip archive at bytes [start, start + length) of `path`, parsed and validated.

    `context` names the archive in messages when it is one record of a larger file.
    """

    def __init__(self, path: str | os.PathLike, start: int = 0, length: int | None = None,
                 context: str = ""):
        self.path = as_path(path)
        self.context = context
        # An s3:// object is read through one ranged-read file (its blocks cached, the local
        # headers prefetched in one parallel batch); a local file with pread on a descriptor.
        self._remote = open_file(self.path) if is_remote(self.path) else None
        if self._remote is not None:
            self._open_window(self._remote.size, start, length)
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(self.path, f"cannot be opened ({type(e).__name__}: {e.strerror or e})",
                                  "check that the file exists and that this user may read it") from e
        try:
            self._fd = fd
            self._open_window(os.fstat(fd).st_size, start, length)
        finally:
            self._fd = None
            os.close(fd)

    def _open_window(self, size: int, start: int, length: int | None) -> None:
        if length is None:
            length = size - start
        if start < 0 or length < 0 or start + length > size:
            self._fail(f"bytes [{start}, {start + length}) lie outside the file ({size} bytes)")
        self.start, self.length = start, length
        try:
            self.records = self._parse()
            self._check_torch_records()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a case the checks above missed is still the file's
            self._fail(f"has a damaged zip structure ({type(e).__name__}: {e})", cause=e)

    # -- errors and reads -----------------------------------------------------------
    def _fail(self, problem: str, way_out: str = CORRUPT, cause: BaseException | None = None):
        err = CheckpointError(self.path, f"{self.context}{problem}", way_out)
        if cause is not None:
            raise err from cause
        raise err

    def _pread(self, offset: int, n: int) -> bytes:
        """n bytes at `offset` of the window; short reads are faults of the archive."""
        if offset < 0 or n < 0 or offset + n > self.length:
            self._fail(f"needs bytes [{offset}, {offset + n}) of a {self.length}-byte archive")
        if self._remote is not None:
            self._remote.seek(self.start + offset)
            got = self._remote.read(n)
            if len(got) != n:
                self._fail(f"ends at byte {self.start + offset + len(got)}, before the {n} bytes"
                           f" at {self.start + offset} it needs")
            return got
        fd = self._fd  # open while the structure is parsed; later reads open the file again
        own = fd is None
        try:
            if own:
                fd = os.open(self.path, os.O_RDONLY)
            parts, done = [], 0
            while done < n:
                got = os.pread(fd, n - done, self.start + offset + done)
                if not got:
                    self._fail(f"ends at byte {self.start + offset + done}, before the {n} bytes"
                               f" at {self.start + offset} it needs")
                parts.append(got)
                done += len(got)
            return b"".join(parts)
        except OSError as e:
            self._fail(f"cannot be read ({type(e).__name__}: {e.strerror or e})",
                       "check that the file exists and that this user may read it", e)
        finally:
            if own and fd is not None:
                os.close(fd)

    # -- the zip structure ----------------------------------------------------------
    def _parse(self) -> dict[str, Record]:
        n = self.length
        if n < _EOCD.size + _LOCAL.size:
            self._fail(f"is too short ({n} bytes) to be a torch zip archive")
        if self._pread(0, 4) != MAGIC:
            self._fail("does not start with a zip local header")
        # The end record is the last thing in the file, followed only by its comment.
        tail_len = min(n, _EOCD.size + 0xFFFF)
        tail = self._pread(n - tail_len, tail_len)
        pos = tail.rfind(b"PK\x05\x06", 0, tail_len - _EOCD.size + 4)
        while pos >= 0:
            _, _, _, _, _, _, _, comment = _EOCD.unpack_from(tail, pos)
            if pos + _EOCD.size + comment == tail_len:
                break
            pos = tail.rfind(b"PK\x05\x06", 0, pos)
        if pos < 0:
            self._fail("has no zip end-of-central-directory record at its end (cut short?)")
        eocd = n - tail_len + pos
        _, disk, cd_disk, here, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos)
        end_of_cd = eocd
        locator = eocd - _EOCD64_LOCATOR.size
        if locator >= 0 and self._pread(locator, 4) == b"PK\x06\x07":
            _, eocd64_disk, eocd64, disks = _EOCD64_LOCATOR.unpack(self._pread(locator, _EOCD64_LOCATOR.size))
            if eocd64_disk != 0 or disks != 1 or eocd64 + _EOCD64.size > locator:
                self._fail("has a damaged zip64 end-of-central-directory locator")
            wide = _EOCD64.unpack(self._pread(eocd64, _EOCD64.size))
            if wide[0] != b"PK\x06\x06":
                self._fail("has a damaged zip64 end-of-central-directory record")
            # The 32-bit fields either agree or say "see the zip64 record".
            for narrow, value, sentinel in zip((disk, cd_disk, here, entries, cd_size, cd_offset), wide[4:],
                                               (0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, _U32, _U32)):
                if narrow not in (value, sentinel):
                    self._fail("has end-of-central-directory records that disagree")
            disk, cd_disk, here, entries, cd_size, cd_offset = wide[4:]
            end_of_cd = eocd64
        if disk or cd_disk or here != entries:
            self._fail("is a multi-disk zip archive, which torch never writes")
        # The central directory ends where the end record(s) begin: no gap, no prefix.
        if cd_offset + cd_size != end_of_cd or entries * _CENTRAL.size > cd_size:
            self._fail(f"has a damaged central directory (says {entries} entries, {cd_size} bytes"
                       f" at {cd_offset}; the end record is at {end_of_cd})")
        cd = self._pread(cd_offset, cd_size)
        records: dict[str, Record] = {}
        order: list[str] = []
        spans: list[tuple[int, int, str]] = []
        p = 0
        for _ in range(entries):
            if p + _CENTRAL.size > cd_size:
                self._fail("has a central directory shorter than its entry count")
            (sig, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len,
             disk, _, attributes, header) = _CENTRAL.unpack_from(cd, p)
            if sig != b"PK\x01\x02":
                self._fail(f"has a damaged central directory entry at byte {cd_offset + p}")
            end = p + _CENTRAL.size + name_len + extra_len + comment_len
            if end > cd_size:
                self._fail("has a central directory entry running past the directory's end")
            try:
                name = cd[p + _CENTRAL.size : p + _CENTRAL.size + name_len].decode("utf-8")
            except UnicodeDecodeError as e:
                self._fail(f"has a record name that is not UTF-8 at byte {cd_offset + p}", cause=e)
            extra = cd[p + _CENTRAL.size + name_len : p + _CENTRAL.size + name_len + extra_len]
            usize, csize, header = self._zip64(extra, usize, csize, header, name)
            p = end
            if name in records:
                self._fail(f"names the record {name!r} twice")
            if disk:
                self._fail(f"record {name!r} is on disk {disk} of a multi-disk archive")
            if attributes & 0x10 or name.endswith("/"):
                # miniz reads a "directory" as empty, so torch would hand back garbage.
                self._fail(f"record {name!r} is marked as a directory")
            if flags & ~_FLAGS_OK:
                self._fail(f"record {name!r} has zip flags {flags:#06x} (encryption or patch data),"
                           " which torch never writes")
            if method != 0:
                self._fail(f"record {name!r} is compressed (zip method {method}); torch archives store"
                           " records uncompressed so that they can be read in place",
                           "re-pack the archive with ZIP_STORED, or load and save it again with torch.save")
            if csize != usize:
                self._fail(f"record {name!r}: stored size {csize} != size {usize}")
            order.append(name)
            records[name] = Record(name, header, usize, crc)  # data offset: from the local header, below
        if p != cd_size:
            self._fail(f"has {cd_size - p} unexplained bytes in its central directory")
        if self._remote is not None:  # every local header in one parallel batch, not a request each
            # (header, name, extra: torch's alignment padding is under 64 bytes, zip64 adds 20)
            self._remote.prefetch([(self.start + r.offset, _LOCAL.size + len(r.name.encode()) + 0x100)
                                   for r in records.values()])
        for name in order:
            header, usize, crc = records[name].offset, records[name].size, records[name].crc
            data = self._local(name, header, usize, cd_offset)
            records[name] = Record(name, self.start + data, usize, crc)
            spans.append((header, data + usize, name))
        spans.sort()
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                self._fail(f"records {a!r} and {b!r} overlap")
        self.order = order
        return records

    def _zip64(self, extra: bytes, usize: int, csize: int, header: int, name: str):
        """Sizes and header offset, from the zip64 extra field where the 32-bit ones say so."""
        need = [v == _U32 for v in (usize, csize, header)]
        if not any(need):
            return usize, csize, header
        q = 0
        while q + 4 <= len(extra):
            tag, size = struct.unpack_from("<2H", extra, q)
            if tag == 0x0001:
                body, values, r = extra[q + 4 : q + 4 + size], [usize, csize, header], 0
                for i in range(3):
                    if need[i]:
                        if r + 8 > len(body):
                            self._fail(f"record {name!r} has a short zip64 extra field")
                        values[i] = struct.unpack_from("<Q", body, r)[0]
                        r += 8
                return tuple(values)
            q += 4 + size
        self._fail(f"record {name!r} needs a zip64 extra field and has none")

    def _local(self, name: str, header: int, size: int, cd_offset: int) -> int:
        """Where the record's data start, from its own local header (never computed)."""
        if header + _LOCAL.size > cd_offset:
            self._fail(f"record {name!r}: local header at {header} lies outside the records")
        (sig, _, flags, method, _, _, _, csize, usize, name_len, extra_len) = _LOCAL.unpack(
            self._pread(header, _LOCAL.size))
        if sig != MAGIC:
            self._fail(f"record {name!r}: no local header at byte {self.start + header}")
        local_name = self._pread(header + _LOCAL.size, name_len)
        if local_name != name.encode("utf-8"):
            self._fail(f"record {name!r}: its local header names {local_name[:80]!r}")
        if method != 0:
            self._fail(f"record {name!r}: its local header says compressed (method {method})")
        if flags & ~_FLAGS_OK:
            self._fail(f"record {name!r}: its local header has zip flags {flags:#06x}")
        # With a data descriptor (flag bit 3) the local sizes may be 0; a value given must agree.
        for value in (csize, usize):
            if value not in (0, _U32, size) or (value == 0 and size and not flags & 0x8):
                self._fail(f"record {name!r}: its local header says {value} bytes, the central"
                           f" directory {size}")
        data = header + _LOCAL.size + name_len + extra_len
        if data + size > cd_offset:
            self._fail(f"record {name!r}: bytes [{self.start + data}, {self.start + data + size}) run"
                       f" into the central directory at {self.start + cd_offset}")
        return data

    # -- what torch requires of the records -----------------------------------------
    def _check_torch_records(self) -> None:
        if not self.order:
            self._fail("is a zip archive without records")
        first = self.order[0]
        if "/" not in first:
            self._fail(f"is no torch archive: its first record {first!r} is not in a folder")
        self.prefix = first.split("/", 1)[0] + "/"
        if self.prefix + "constants.pkl" in self.records:
            self._fail("is a TorchScript archive, not a torch.save file",
                       "load it with torch.jit.load and save its state_dict() with torch.save")
        version = self.small(".data/version", required=False) or self.small("version")
        try:
            number = int(version)
        except ValueError as e:
            self._fail(f"has an unreadable format version {version[:20]!r}", cause=e)
        if not _MIN_VERSION <= number <= _MAX_VERSION:
            self._fail(f"has format version {number}; torch reads {_MIN_VERSION}..{_MAX_VERSION}",
                       "save it again with the torch version you load it with")
        order = self.small("byteorder", required=False)
        if order not in (None, b"little", b"big"):
            self._fail(f"has an unknown byte order {order[:20]!r}")
        self.big_endian = order == b"big"
        serialization_id = self.small(".data/serialization_id", required=False)
        if serialization_id is not None:
            try:
                serialization_id.decode("utf-8")  # torch.load decodes it
            except UnicodeDecodeError as e:
                self._fail("has a damaged serialization id", cause=e)
        alignment = self.small(".storage_alignment", required=False)
        if alignment is not None:
            try:
                int(alignment)
            except ValueError as e:
                self._fail(f"has an unreadable storage alignment {alignment[:20]!r}", cause=e)
        if self.prefix + "data.pkl" not in self.records:
            self._fail("has no data.pkl record (the pickle of the saved object)")

    def small(self, name: str, required: bool = True) -> bytes | None:
        """A metadata record's bytes, CRC-checked (it is read whole anyway)."""
        rec = self.records.get(self.prefix + name)
        if rec is None:
            if required:
                self._fail(f"has no {name!r} record")
            return None
        if rec.size > _SMALL_RECORD:
            self._fail(f"record {name!r} is {rec.size} bytes, far more than it can hold")
        return self._whole(rec)

    def _whole(self, rec: Record) -> bytes:
        data = self._pread(rec.offset - self.start, rec.size)
        if zlib.crc32(data) != rec.crc:
            self._fail(f"record {rec.name!r} fails its CRC check (damaged bytes)")
        return data

    # -- the pickle -----------------------------------------------------------------
    def load(self, allow_globals=(), trust_pickle: bool = False):
        """The saved object, every tensor on the meta device with its storage's bytes located.

        `allow_globals` rebuilds the named pickle globals as inert stand-ins; `trust_pickle`
        unpickles with plain pickle (runs code from the file).
        """
        data = self._whole(self.records[self.prefix + "data.pkl"])
        storages: dict[str, torch.storage.TypedStorage] = {}

        def persistent_load(saved_id):
            return self._storage(saved_id, storages)

        try:
            if trust_pickle:
                unpickler = _TrustedUnpickler(io.BytesIO(data))
                unpickler.persistent_load = persistent_load
                return unpickler.load()
            with torch.serialization.safe_globals([(stand_in(n), n) for n in allow_globals]):
                unpickler = _SafeUnpickler(io.BytesIO(data), persistent_load)
                return unpickler.load()
        except CheckpointError:
            raise
        except pickle.UnpicklingError as e:
            name = blocked_global(str(e))
            if name is None:
                self._fail(f"cannot be unpickled safely: {str(e).splitlines()[0] if str(e) else e!r}",
                           "the file is corrupt or not a torch checkpoint", e)
            self._fail(
                f"the pickle needs the global {name!r}, which weights_only=True does not allow"
                " (graft never retries with unsafe unpickling)",
                f"save only the state dict; or pass allow_globals=[{name!r}] to rebuild it as an"
                " inert stand-in; or, for a file you trust completely, trust_pickle=True", e)
        except Exception as e:  # noqa: BLE001 - any fault of the untrusted pickle is the file's
            first = str(e).splitlines()[0] if str(e) else ""
            self._fail(f"is corrupt or truncated: its pickle cannot be read ({type(e).__name__}"
                       f"{': ' + first[:200] if first else ''})", cause=e)

    def _storage(self, saved_id, storages: dict) -> torch.storage.TypedStorage:
        """A meta storage for the pickle's ('storage', type, key, location, numel), its bytes
        located in the record `data/<key>`, which must hold exactly numel * itemsize bytes."""
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5
                and torch.serialization._maybe_decode_ascii(saved_id[0]) == "storage"):
            self._fail(f"its pickle names an unknown persistent object {str(saved_id)[:80]}")
        _, storage_type, key, _, numel = saved_id
        key = torch.serialization._maybe_decode_ascii(key) if isinstance(key, bytes) else key
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        elif isinstance(getattr(storage_type, "dtype", None), torch.dtype):
            dtype = storage_type.dtype
        else:
            self._fail(f"its pickle names a storage of unknown type {storage_type!r}")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            self._fail(f"its pickle names a malformed storage {str(saved_id)[:80]}")
        nbytes = numel * dtype.itemsize
        if key in storages:
            known = storages[key]
            if known.dtype != dtype or known._size() != numel:
                self._fail(f"its pickle names storage {key!r} twice, as {known._size()} x {known.dtype}"
                           f" and as {numel} x {dtype}")
            return known
        rec = self.records.get(f"{self.prefix}data/{key}")
        if rec is None:
            self._fail(f"its pickle names storage {key!r}, but the archive has no record data/{key}")
        if rec.size != nbytes:
            self._fail(f"storage {key!r}: the pickle says {numel} x {dtype} = {nbytes} bytes, the"
                       f" record data/{key} holds {rec.size}")
        storage = torch.UntypedStorage(nbytes, device="meta")
        storage._graft_stored = Stored(str(self.path), rec.offset, nbytes, key, self.big_endian)
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        storages[key] = typed
        return typed


class _SafeUnpickler(torch._weights_only_unpickler.Unpickler):
    """torch's weights_only unpickler (the one torch.load uses), with our storage lookup."""

    def __init__(self, file, persistent_load):
        super().__init__(file, encoding="utf-8")
        self._persistent_load = persistent_load

    def persistent_load(self, pid):
        return self._persistent_load(pid)


class _TrustedUnpickler(pickle.Unpickler):
    """Plain pickle (trust_pickle=True only), mapping names as torch.load does."""

    def find_class(self, module: str, name: str):
        if type(name) is str and "Storage" in name:
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        module = {"torch.tensor": "torch._tensor"}.get(module, module)
        return super().find_class(module, name)


def blocked_global(message: str) -> str | None:
    """The global a weights_only unpickler refused, from torch's message."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message) or re.search(
        r"GLOBAL ([\w.]+) was not an allowed global", message
    )
    return m.group(1) if m else None


def stand_in(qualified_name: str) -> type:
    """An inert class that takes the place of a pickled global: state is kept, no code runs."""
    module, _, name = qualified_name.rpartition(".")

    def __init__(self, *args, **kwargs):
        # Globals pickled as calls (enums, namedtuples) arrive with their arguments.
        self.__dict__["_args"] = args
        self.__dict__["_kwargs"] = kwargs

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    return type(name, (), {"__module__": module, "__init__": __init__, "__setstate__": __setstate__,
                           "__reduce__": object.__reduce__})


# -- tensors of a loaded archive ------------------------------------------------------
def stored(t: torch.Tensor) -> Stored | None:
    """Where the bytes of a tensor loaded by `Archive.load` are; None for other tensors."""
    if t.layout != torch.strided:
        return None
    return getattr(t.untyped_storage(), "_graft_stored", None)


def check_view(t: torch.Tensor, path, key: str) -> Stored:
    """The tensor's storage, after checking that its view lies inside it (torch.load refuses
    a storage_offset past the end; so do we, before any byte is read)."""
    try:
        return _check_view(t, path, key)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - an odd tensor from an untrusted pickle
        raise CheckpointError(path, f"{key!r}: its tensor cannot be described ({type(e).__name__}: {e})",
                              CORRUPT) from e


def _check_view(t: torch.Tensor, path, key: str) -> Stored:
    s = stored(t)
    if s is None:
        raise CheckpointError(path, f"{key!r} is a {t.layout} tensor, which graft cannot read in place"
                              if t.layout != torch.strided else f"{key!r} has no storage record",
                              "save a state dict of ordinary dense tensors")
    item = t.element_size()
    offset = t.storage_offset()
    if any(n < 0 for n in t.shape) or any(st < 0 for st in t.stride()) or offset < 0:
        raise CheckpointError(path, f"{key!r}: malformed view (shape {tuple(t.shape)}, stride"
                              f" {t.stride()}, offset {offset})", CORRUPT)
    extent = 0 if t.numel() == 0 else 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    if (offset + extent) * item > s.nbytes:
        raise CheckpointError(path, f"{key!r}: its view (offset {offset}, {extent} elements of"
                              f" {item} bytes) runs past the end of its storage ({s.nbytes} bytes)", CORRUPT)
    return s


def span_of(t: torch.Tensor, path, key: str) -> Span | None:
    """Where in its file a contiguous, little-endian tensor's values are; None when they are
    not one plain byte range (then `read_tensor`)."""
    s = check_view(t, path, key)
    if not t.is_contiguous() or _needs_swap(s, t):
        return None
    return Span(s.file, s.offset + t.storage_offset() * t.element_size(), t.numel() * t.element_size())


def read_tensor(t: torch.Tensor, path, key: str) -> torch.Tensor:
    """A CPU tensor with the values of a (meta) tensor of a loaded archive: only the bytes its
    view spans are read, then viewed with its strides (and byte-swapped if need be)."""
    s = check_view(t, path, key)
    item = t.element_size()
    extent = 0 if t.numel() == 0 else 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    first = s.offset + t.storage_offset() * item
    buf = torch.empty(extent * item, dtype=torch.uint8)
    view = writable_buffer(buf)
    if is_remote(s.file):
        read_ranges(S3Path(s.file), [(first, len(view), view)])
        return _as_viewed(buf, s, t)
    try:
        with open(s.file, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                n = os.preadv(f.fileno(), [view[done:]], first + done)
                if n <= 0:
                    raise CheckpointError(s.file, f"{key!r}: the file ends at byte {first + done}, before"
                                          f" its {len(view)} bytes at {first}", CORRUPT)
                done += n
    except OSError as e:
        raise CheckpointError(s.file, f"cannot be read for {key!r} ({type(e).__name__}: {e.strerror or e})",
                              "check that the file exists and that this user may read it") from e
    return _as_viewed(buf, s, t)


def _as_viewed(buf: torch.Tensor, s, t: torch.Tensor) -> torch.Tensor:
    values = buf.view(t.dtype)
    if _needs_swap(s, t):
        values.untyped_storage().byteswap(t.dtype)
    return torch.as_strided(values, t.shape, t.stride(), 0)


def check_tensors(obj, path, depth: int = 0) -> None:
    """Check every dense tensor's view of a loaded object (dicts, lists, tuples) at once."""
    if depth > 64:
        return
    if isinstance(obj, torch.Tensor):
        if stored(obj) is not None:
            check_view(obj, path, "a tensor")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                if stored(v) is not None:
                    check_view(v, path, str(k))
            else:
                check_tensors(v, path, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            check_tensors(v, path, depth + 1)


def _needs_swap(s: Stored, t: torch.Tensor) -> bool:
    return s.big_endian != (sys.byteorder == "big") and t.element_size() > 1
