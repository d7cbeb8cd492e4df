"""How bulk range reads run: merged, cut into parts, fetched in parallel, copied once.

The items `(offset, nbytes, memoryview)` of one or more objects are planned per object:
ranges closer than `settings.merge_gap` are merged into one request, smallest gaps first,
while the bytes fetched for nothing stay under `settings.max_waste` of the bytes wanted;
merged ranges are cut into `settings.part_size` parts, `settings.concurrency` in flight;
each part's bytes are copied once, from the client's response buffer into the destination
memoryviews (obstore hands back one buffer per response; there is no API to receive into
caller memory). Failures are retried by the store (`Bucket.fetch`: `settings.attempts`,
exponential backoff with jitter) on top of obstore's own request retries; what cannot be
read is a `CheckpointError` naming `s3://bucket/key` and the byte range.

Works on `S3Path` values and never makes one from a URL, so that S3Path.read_bytes and S3File
(graft.storage.paths) use it; the public `read_ranges` (graft.storage.reading) resolves URLs
first.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from graft.storage.failures import missing_error, truncated
from graft.storage.stores import Bucket, ObjectInfo, store_for
from graft.storage.tuning import settings

if TYPE_CHECKING:  # annotations only: graft.storage.paths imports this module
    from graft.storage.paths import S3Path


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


def _check_items(path: S3Path, info: ObjectInfo, items) -> list[tuple[int, int, memoryview]]:
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
            raise truncated(path, (offset, offset + nbytes), info.size)
        out.append((offset, nbytes, view))
    return out


def read_items(bucket: Bucket, path: S3Path, info: ObjectInfo, items, on_bytes) -> int:
    """Read checked items of the object `path` (its `info` already known); returns bytes fetched."""
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


def read_objects(requests: Iterable[tuple[S3Path, Iterable[tuple[int, int, memoryview]]]],
                 on_bytes: Callable[[int], None] | None = None) -> int:
    """`read_ranges_many` for S3Path values: every object's items in one pool; returns bytes fetched.

    Every object is stat'ed and every range checked against its size before any byte is read.
    """
    jobs = []
    for path, items in requests:
        bucket = store_for(path)
        info = bucket.object_info(path)
        if info is None:
            raise missing_error(bucket, path)
        checked = _check_items(path, info, items)
        jobs.extend((bucket, path, info, part) for part in _parts(_plan(checked)))
    return _run_parts(jobs, on_bytes)
