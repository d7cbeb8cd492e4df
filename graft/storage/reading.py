"""`read_ranges` / `read_ranges_many`: the bulk tensor reader over s3:// URLs.

The work is done by graft.storage.ranges, which takes `S3Path` values; these public entry
points resolve URL strings into S3Paths first. They live above graft.storage.paths (S3Path
reads through `ranges` directly), which is why they are not in `ranges` itself.
"""

from __future__ import annotations

from typing import Callable, Iterable

from graft.storage.paths import S3Path
from graft.storage.ranges import read_objects


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
    return read_objects(((S3Path(path), items) for path, items in requests), on_bytes)
