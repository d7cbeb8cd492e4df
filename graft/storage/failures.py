"""What goes wrong with S3, and what graft says about it.

`classify(e)` sorts an obstore error into a kind: a missing object or bucket, access denied,
bad credentials, truncated, replaced since graft saw it (ETag changed), the wrong region,
worth a retry (connection errors, dropped responses, timeouts, 5xx), or refused. Only the
kind "retry" is tried again (`sleep_backoff` between tries, on top of obstore's own request
retries); the `*_error` functions turn a kind into a `CheckpointError` (reads) or a
`StorageError` (writes) that names `s3://bucket/key`, the byte range and the way out. Some
look around first: the names stored near a missing object, S3's reason for a refusal.

Its own module so that the stores, the path and file objects, and the readers and writers
share one policy; it takes the store as an argument instead of importing it.
"""

from __future__ import annotations

import random
import re
import time
from typing import TYPE_CHECKING

from graft.errors import CheckpointError, GraftError, StorageError
from graft.storage.tuning import settings

if TYPE_CHECKING:  # annotations only: the stores and paths import this module
    from graft.storage.paths import S3Path
    from graft.storage.stores import Bucket


class MissingExtraError(GraftError, ImportError):
    """An s3:// path was used but the client library of the `[s3]` extra is not installed."""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {line[:300]}"


def classify(e: BaseException) -> tuple[str, str]:
    """(kind, one-line detail) of an obstore error.

    kinds: missing, no-bucket, denied, credentials, truncated, changed, region, retry
    (connection errors, dropped responses, timeouts, 5xx), refused (another 4xx).
    """
    text = str(e)
    code_match = re.search(r"<Code>([^<]+)</Code>", text)
    code = code_match[1] if code_match else ""
    status_match = re.search(r"status code: (\d{3})", text)
    status = int(status_match[1]) if status_match else 0
    detail = first_line(e) if not code else f"{code}, HTTP {status or '?'}"
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
        return "credentials", first_line(e)
    if name in ("InvalidPathError", "NotSupportedError", "UnknownConfigurationKeyError", "AlreadyExistsError"):
        return "refused", detail
    return "retry", detail


def sleep_backoff(tries: int) -> None:
    """Wait before try `tries + 1`: exponential from `settings.backoff_s`, capped, with jitter."""
    delay = min(settings.max_backoff_s, settings.backoff_s * 2 ** (tries - 1))
    time.sleep(delay * (0.5 + random.random() / 2))


def truncated(path: S3Path, span: tuple[int, int] | None, got_to: int | None) -> CheckpointError:
    where = f"bytes [{span[0]}, {span[1]})" if span else "bytes past its end"
    have = f" but the object ends at byte {got_to}" if got_to is not None else " but the object is shorter"
    return CheckpointError(path, f"truncated: needs {where}{have}",
                           "the object was cut short (interrupted upload or copy); upload it again")


def missing_error(bucket: Bucket, path: S3Path, problem: str | None = None) -> CheckpointError:
    """The error for an object or folder that is not there: a missing bucket, or the names nearby."""
    if not bucket.bucket_exists(path):
        return CheckpointError(path, f"the bucket {bucket.name!r} does not exist ({bucket.setup.where()})",
                               "check the bucket name, and that AWS_ENDPOINT_URL / AWS_REGION point"
                               " at the storage that holds it")
    parent = path.parent
    try:
        chunk = next(iter(bucket.obs.list(bucket.store, parent.key or None, chunk_size=50)), [])
    except Exception:  # noqa: BLE001 - the names are only a hint
        chunk = []
    cut = len(parent.key) + 1 if parent.key else 0
    near = sorted({m["path"][cut:].split("/")[0] for m in chunk})[:10]
    hint = f"; under {parent}: {', '.join(near)}" if near else f"; nothing is stored under {parent}"
    return CheckpointError(path, problem or "no such object", f"check the path{hint}")


def read_error(bucket: Bucket, path: S3Path, e: BaseException, span: tuple[int, int] | None = None,
               tries: int = 1) -> CheckpointError:
    """The error for a read of `path` (bytes `span`, after `tries` tries) that failed with `e`."""
    kind, detail = classify(e)
    where = f" bytes [{span[0]}, {span[1]})" if span else ""
    if kind == "missing":
        return missing_error(bucket, path)
    if kind == "no-bucket":
        return CheckpointError(path, f"the bucket {bucket.name!r} does not exist ({bucket.setup.where()})",
                               "check the bucket name, and that AWS_ENDPOINT_URL / AWS_REGION point"
                               " at the storage that holds it")
    if kind in ("denied", "credentials"):
        detail = _why_denied(bucket, path, e, detail)
        return CheckpointError(path, f"access denied{' reading' + where if where else ''}: {detail}",
                               f"check the credentials (graft used {bucket.setup.credentials_from})"
                               f" and that they may read this bucket ({bucket.setup.where()});"
                               " set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if kind == "truncated":
        return truncated(path, span, None)
    if kind == "changed":
        return CheckpointError(path, f"was replaced while graft was reading it (ETag changed;{where})",
                               "wait for the writer to finish, then load again")
    if kind == "region":
        return CheckpointError(path, f"is in another region than the one used ({detail})",
                               "set AWS_REGION to the bucket's region")
    if kind == "retry":
        return CheckpointError(path, f"cannot be read:{where} failed {tries} time(s), each after"
                                     f" {settings.client_retries} client retries ({detail})",
                               f"check the network and the endpoint ({bucket.setup.where()}); graft"
                               f" retries {settings.attempts} times with backoff"
                               " (graft.storage.settings.attempts)")
    return CheckpointError(path, f"cannot be read:{where} the server refused ({detail})",
                           f"check the path, the credentials and the endpoint ({bucket.setup.where()})")


def _why_denied(bucket: Bucket, path: S3Path, e: BaseException, detail: str) -> str:
    """S3's reason (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied...) for a refusal.

    A refused HEAD has no body to say why; one 1-byte GET of the same object (refused for
    the same reason) carries the error document.
    """
    if "<Code>" in str(e) or not path.key:
        return detail
    try:
        bucket.obs.get(bucket.store, path.key, options={"range": (0, 1)}).bytes()
    except Exception as again:  # noqa: BLE001
        kind, why = classify(again)
        if kind in ("denied", "credentials"):
            return why
    return detail


def write_error(bucket: Bucket, path: S3Path, e: BaseException, doing: str) -> StorageError:
    """The error for a write (`doing`: "writing the object", "uploading x"...) that failed with `e`."""
    kind, detail = classify(e)
    if kind == "no-bucket":
        return StorageError(path, f"{doing} failed: the bucket {bucket.name!r} does not exist",
                            f"create it, or check the bucket name and {bucket.setup.where()}")
    if kind in ("denied", "credentials"):
        if "<Code>" not in str(e) and path.key:
            detail = _why_denied(bucket, path, e, detail)
        return StorageError(path, f"{doing} failed: access denied ({detail})",
                            f"check the credentials (graft used {bucket.setup.credentials_from}) and that they"
                            " may write this bucket")
    return StorageError(path, f"{doing} failed ({detail})",
                        f"check the network, the endpoint ({bucket.setup.where()}) and free quota;"
                        " then save again")
