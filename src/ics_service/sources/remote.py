"""Object storage through fsspec: S3 (s3fs, paginated listing of its own) and any other
installed fsspec protocol (gcs://, az://...) through the same `FsspecSource`.

Listing streams: S3 prefixes are listed one ListObjectsV2 page at a time (`list_objects`,
in key order, optionally after a given key, which is what a poller keeps as its cursor);
other protocols are walked one folder at a time. Reading is one GET whose size is checked
from its headers before the body is read.

Errors: a missing key is a per-item `SourceNotFound`; timeouts, throttling and 5xx are
`SourceUnavailable` (retried by the SerializeImageData policy). While listing, a missing
bucket, bad credentials or a denied access is a `UsageError` naming the bucket; a store that
cannot be reached is `EnvironmentUnavailable`.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import logging
import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import (
    EnvironmentUnavailable,
    ImageTooLarge,
    SourceNotFound,
    SourceUnavailable,
    SourceUnreadable,
    UsageError,
)
from ..imaging import IMAGE_EXTENSIONS
from ..policies import transient_error, transient_status

log = logging.getLogger(__name__)

#: Protocols handled by s3fs (ListObjectsV2 paging, one-GET reads).
S3_PROTOCOLS = ("s3", "s3a")
#: Other object stores served through plain fsspec when their package is installed.
OTHER_PROTOCOLS = ("gcs", "gs", "az", "abfs", "abfss", "oss")
#: Keys per ListObjectsV2 page (S3's own maximum).
PAGE_SIZE = 1000
#: OSError numbers that s3fs gives throttling (SlowDown, 503) and 5xx answers.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", 121), errno.EAGAIN})
#: Exception type names (botocore, aiohttp, fsspec) that mean "try again later".
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "AioReadTimeoutError",
        "ConnectionClosedError",
        "FSTimeoutError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectorError",
        "IncompleteRead",
        "ResponseStreamingError",
    }
)
_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError"})


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None


def split_url(uri: str) -> tuple[str, str, str]:
    """(protocol, bucket, key) of ``proto://bucket/key``."""
    protocol, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UsageError(f"{uri} names no bucket; write {protocol}://BUCKET/PREFIX")
    return protocol.lower(), bucket, key


def list_objects(
    fs: Any, bucket: str, prefix: str = "", *, start_after: str | None = None
) -> Iterator[ObjectInfo]:
    """Every object under prefix in an S3 bucket, in key order, one page in memory at a
    time; after `start_after` only (a poller's cursor). Errors as `FsspecSource.list`."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_SIZE}
    if start_after:
        kwargs["StartAfter"] = start_after
    while True:
        try:
            page = fs.call_s3("list_objects_v2", **kwargs)
        except Exception as e:
            raise listing_error(e, f"s3://{bucket}/{prefix}", bucket) from None
        for obj in page.get("Contents", ()):
            yield ObjectInfo(
                key=obj["Key"],
                size=int(obj.get("Size", 0)),
                etag=str(obj.get("ETag", "")).strip('"'),
                last_modified=obj.get("LastModified"),
            )
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        kwargs["ContinuationToken"] = token


class FsspecSource:
    """Items on an fsspec file system: ``PROTOCOL://BUCKET/KEY`` URIs."""

    def __init__(self, protocol: str, options: Mapping[str, Any] | None = None) -> None:
        self.protocol = protocol
        self.options = dict(options or {})
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        """The file system, made on first use (importing s3fs takes a while)."""
        if self._fs is None:
            import fsspec

            try:
                # Its own instance: fsspec's cache would hand back one made earlier with
                # other credentials or another endpoint (read when its session started).
                options: dict[str, Any] = {"skip_instance_cache": True, **self.options}
                if not self.is_s3:
                    # Walked folders are not kept: a listing holds one folder at a time.
                    options.setdefault("use_listings_cache", False)
                self._fs = fsspec.filesystem(self.protocol, **options)
            except (ImportError, TypeError, ValueError) as e:
                raise UsageError(
                    f"cannot use {self.protocol}:// storage: {e}; check [storage."
                    f"{self.protocol}] in the settings and that its fsspec package is installed"
                ) from None
        return self._fs

    def close(self) -> None:
        """Drop the file system (when `configure` replaces this source): s3fs closes its
        session when the file system is collected (closing it here as well would close it
        twice)."""
        self._fs = None

    @property
    def is_s3(self) -> bool:
        return self.protocol in S3_PROTOCOLS

    def list(self, spec: str) -> Iterator[str]:
        """A key names itself; a bucket, a prefix ending in /, or a key that is also a
        "folder" lists every image object under it (recursively, in key order)."""
        protocol, bucket, key = split_url(spec)
        base = f"{protocol}://{bucket}/"
        if key and not key.endswith("/"):
            # One request tells a key from a folder of the same name. Credentials that may
            # read objects but not list the bucket fail it: the key is then an item, and
            # its read says what is wrong, if anything.
            folder = iter(self._keys(spec, bucket, key + "/"))
            try:
                first = next(folder, None)
            except (UsageError, EnvironmentUnavailable) as e:
                log.debug("listing %s/ failed (%s): taken as a key", spec, e)
                first = None
            if first is None:
                yield base + key
                return
            if listed(first):
                yield base + first
            keys: Iterator[str] = folder
        else:
            keys = iter(self._keys(spec, bucket, key))
        for k in keys:
            if listed(k):
                yield base + k

    def _keys(self, spec: str, bucket: str, prefix: str) -> Iterator[str]:
        if self.is_s3:
            for obj in list_objects(self.fs, bucket, prefix):
                yield obj.key
            return
        root = f"{bucket}/{prefix}".rstrip("/")
        try:
            if not self.fs.exists(bucket):
                raise FileNotFoundError(bucket)
            # walk lists one folder at a time (find would collect the whole tree first).
            for folder, dirs, files in self.fs.walk(root, detail=False):
                dirs.sort()
                for name in sorted(files):
                    path = posixpath.join(folder, name).lstrip("/")
                    if path.startswith(bucket + "/"):
                        yield path[len(bucket) + 1 :]
        except Exception as e:
            raise listing_error(e, spec, bucket) from None

    def read(self, uri: str, max_bytes: int) -> bytes:
        _, bucket, key = split_url(uri)
        try:
            if self.is_s3:
                from fsspec.asyn import sync

                data: bytes = sync(self.fs.loop, _s3_get, self.fs, bucket, key, max_bytes)
                return data
            with self.fs.open(f"{bucket}/{key}", "rb") as f:
                size = getattr(f, "size", None)
                if size is not None and size > max_bytes:
                    raise _too_large(size, max_bytes)
                data = f.read(max_bytes + 1)
        except ImageTooLarge:
            raise
        except Exception as e:
            raise item_error(e, uri) from None
        if len(data) > max_bytes:
            raise ImageTooLarge(f"object is over max_bytes={max_bytes:,}")
        return data


async def _s3_get(fs: Any, bucket: str, key: str, max_bytes: int) -> bytes:
    """The object's bytes in one GET: its Content-Length is checked before the body is read,
    and the body is read no further than max_bytes + 1."""
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    body = resp["Body"]
    try:
        size = resp.get("ContentLength")
        if size is not None and size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks: list[bytes] = []
        got = 0
        while got <= max_bytes:
            chunk = await body.read(min(1 << 20, max_bytes + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > max_bytes:
            raise ImageTooLarge(f"object is over max_bytes={max_bytes:,}")
        return b"".join(chunks)
    finally:
        body.close()


def _too_large(size: int, max_bytes: int) -> ImageTooLarge:
    return ImageTooLarge(f"object is {size:,} bytes, over max_bytes={max_bytes:,}")


def listed(key: str) -> bool:
    """Whether a listed key is an item: not a folder marker, and an image extension or none
    (sidecar files such as .json or .csv next to the images are left out)."""
    if not key or key.endswith("/"):
        return False
    ext = os.path.splitext(posixpath.basename(key))[1].lower()
    return not ext or ext in IMAGE_EXTENSIONS


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_transient(e: BaseException) -> bool:
    """Timeouts, throttling (SlowDown, 503), the statuses `transient_status` retries and
    lost connections."""
    for err in _chain(e):
        if transient_error(err) or isinstance(err, asyncio.TimeoutError):
            return True
        if type(err).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        status = _http_status(err)
        if status is not None and transient_status(status):
            return True
    return False


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def message(e: BaseException) -> str:
    """An error's text, or its type's name when it has none."""
    return str(e).strip() or type(e).__name__


#: S3 error codes that mean the credentials themselves were refused.
_REFUSED_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)


def error_code(e: BaseException) -> str | None:
    """The S3 error code (NoSuchBucket, AccessDenied...) behind e, if botocore gave one."""
    for err in _chain(e):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if isinstance(code, str) and code:
                return code
    return None


def bucket_problem(e: BaseException, protocol: str, bucket: str, may: str) -> str | None:
    """What e says about the bucket itself, naming it and the fix: no credentials, refused
    credentials, a missing bucket, a denied access. None for anything else (a missing
    key, a timeout). `may` is what the credentials must be allowed ("list this bucket")."""
    code = error_code(e)
    if any(type(err).__name__ in _NO_CREDENTIALS for err in _chain(e)):
        return (
            "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            f"or key and secret under [storage.{protocol}]"
        )
    if code in _REFUSED_CREDENTIALS:
        return (
            f"the storage of bucket {bucket!r} refused the credentials ({code}); check "
            f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or [storage.{protocol}])"
        )
    if code == "NoSuchBucket":
        return f"bucket {bucket!r} does not exist; check its name"
    if isinstance(e, PermissionError) or code in ("AccessDenied", "AllAccessDisabled"):
        return (
            f"access to bucket {bucket!r} denied ({message(e)}); check the credentials and "
            f"that they may {may}"
        )
    return None


def item_error(e: BaseException, uri: str) -> Exception:
    """The per-item error for a failed read of uri; a problem of the bucket (missing,
    credentials) names the bucket and the fix."""
    protocol, bucket, _ = split_url(uri)
    problem = bucket_problem(e, protocol, bucket, "read its objects")
    if problem is not None:
        if error_code(e) == "NoSuchBucket":
            return SourceNotFound(f"cannot read {uri}: {problem}")
        return SourceUnreadable(f"cannot read {uri}: {problem}")
    if isinstance(e, FileNotFoundError):
        return SourceNotFound(f"no such object: {uri}")
    if is_transient(e):
        return SourceUnavailable(f"cannot read {uri} now: {message(e)}")
    return SourceUnreadable(f"cannot read {uri}: {message(e)}")


def storage_error(e: BaseException, failed: str, path: str, bucket: str, may: str) -> Exception:
    """The command's error for a bucket-wide request (a listing, a results upload) that
    failed: a UsageError naming the bucket, or EnvironmentUnavailable when the storage
    cannot be reached. `failed` opens the message ("cannot list s3://b/p")."""
    protocol = path.partition("://")[0].lower()
    if isinstance(e, FileNotFoundError) and error_code(e) is None:
        # s3fs gives a missing bucket of a bucket-wide request as a bare FileNotFoundError.
        return UsageError(f"{failed}: bucket {bucket!r} does not exist; check its name")
    problem = bucket_problem(e, protocol, bucket, may)
    if problem is not None:
        return UsageError(f"{failed}: {problem}")
    if is_transient(e):
        return EnvironmentUnavailable(
            f"{failed}: cannot reach the storage of bucket {bucket!r}: {message(e)}"
        )
    return UsageError(f"{failed} (bucket {bucket!r}): {message(e)}")


def listing_error(e: BaseException, spec: str, bucket: str) -> Exception:
    """The command's error for a listing of spec that failed: it names the bucket."""
    return storage_error(e, f"cannot list {spec}", spec, bucket, "list this bucket")


#: The package that implements each of OTHER_PROTOCOLS, as fsspec's registry says (it has
#: no abfss): written here so that start-up does not import fsspec only to ask it.
_PACKAGES = {"gcs": "gcsfs", "gs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "oss": "ossfs"}


def installed(protocol: str) -> bool:
    """Whether the package that implements protocol (and fsspec) can be imported."""
    package = _PACKAGES.get(protocol)
    if package is None:
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("fsspec", package))


def sources_for(storage: Mapping[str, Mapping[str, Any]]) -> dict[str, FsspecSource]:
    """One source per object-storage protocol that is installed, with its storage options."""
    made = {p: FsspecSource(p, storage.get(p, storage.get("s3", {}))) for p in S3_PROTOCOLS}
    for protocol in OTHER_PROTOCOLS:
        if protocol in storage or installed(protocol):
            made[protocol] = FsspecSource(protocol, storage.get(protocol, {}))
    return made
