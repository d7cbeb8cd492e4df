"""The tuning of the S3 layer: one `Settings` object, `graft.storage.settings`.

Its own module because every other module of graft.storage reads it (the stores bake some
fields into their clients; the readers and writers size their requests with the others) and
it depends on nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    """Tuning of the S3 layer; change the attributes of `graft.storage.settings` to adjust."""

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
