"""Which sources a request may read: the server's `allowed_sources` prefixes.

Local paths are compared after resolving `..` and symlinks, and the resolved path is what
is read. An object store key (s3://...) is read as written, so one with `.` or `..`
segments is refused. An http(s) URL is compared by origin (scheme, host, port) and by its
path as the most lenient server would read it: percent-decoded (repeatedly), backslashes
taken for slashes, `;parameters` dropped, and dot segments resolved; so neither
`/public/%2e%2e/secret.jpg` nor `/public/..%2fsecret.jpg` nor `/public/..;/secret.jpg`
passes a `/public/` prefix. The HTTP source asks `confine` of every redirect target too.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Callable

from .. import sources
from ..errors import UsageError
from ..redact import redact_uri

#: Lines a request causes, one per request: throttled by `ics serve` (cli/serve.py).
clients_log = logging.getLogger("ics_service.server.clients")

#: Ports that http(s) URLs without one use.
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Forbidden(UsageError):
    http_status = 403


def allowed_uri(uri: str, allowed: list[str]) -> str:
    """The uri to read, or Forbidden (403) outside every allowed source prefix: paths are
    compared after resolving `..` and symlinks, so neither can escape a root, and the
    resolved path is what is returned."""
    if sources.scheme_of(uri) != "file":
        shown = redact_uri(uri)  # an answer or a log line never holds its credentials
        if _literal_keys(uri) and not _plain_key(uri):
            # An object store reads the key as written, not the normalised path checked.
            raise Forbidden(f"uri {shown!r} has '.' or '..' segments in its key: not read")
        if remote_allowed(uri, allowed):
            return uri
        raise Forbidden(f"uri {shown!r} is not under any allowed_sources prefix")
    local = sources.uri_to_path(uri)
    if "\0" in local:
        raise UsageError(f"uri {uri!r} holds a NUL character: no file is named so")
    path = os.path.realpath(local)
    for prefix in allowed:
        if not _remote(prefix) and _under(path, os.path.realpath(sources.uri_to_path(prefix))):
            return sources.path_to_uri(path)
    raise Forbidden(
        f"uri {uri!r} is not under any allowed_sources prefix"
        + ("" if allowed else " (none is configured: set allowed_sources)")
    )


def item_check(allowed: list[str]) -> Callable[[str], None]:
    """What a listing asks of each item it lists (a new batch's, a resume's): Forbidden
    (403) outside allowed_sources. The error does not name the item, which the log does: a
    list file named in a list file may be outside, and its lines must not reach the client."""

    def check(uri: str) -> None:
        try:
            allowed_uri(uri, allowed)
        except Forbidden:
            clients_log.warning(
                "listed item %s is outside allowed_sources: refused", redact_uri(uri)
            )
            raise Forbidden(
                "an item listed is not under any allowed_sources prefix (a symlink or a list "
                "file leads outside; the server log names it)"
            ) from None

    return check


def confine(allowed: list[str]) -> Callable[[str], bool]:
    """Whether a redirect target may be followed: under a remote allowed_sources prefix."""
    prefixes = [p for p in allowed if _remote(p)]
    return lambda url: remote_allowed(url, prefixes)


def remote_allowed(uri: str, allowed: list[str]) -> bool:
    """Whether a remote uri is under one of the remote prefixes of allowed."""
    return any(_url_under(uri, prefix) for prefix in allowed if _remote(prefix))


def _remote(prefix: str) -> bool:
    return sources.scheme_of(prefix) != "file"


def _under(path: str, root: str) -> bool:
    """Whether the normalised path is root or inside it (a path boundary, not a text prefix)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _literal_keys(uri: str) -> bool:
    """Whether the URI names an object store key (S3, GCS...), which is read as written."""
    return sources.scheme_of(uri) not in ("http", "https")


def _plain_key(uri: str) -> bool:
    """No `.` or `..` segment in the key: no client would read it as the path it seems."""
    key = uri.partition("://")[2].partition("/")[2]
    return not any(p in (".", "..") for p in key.split("/"))


def url_path(path: str) -> str:
    """A URL path as the most lenient server reads it (see the module)."""
    for _ in range(4):  # %252e%252e is %2e%2e once decoded, and .. twice
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            break
        path = decoded
    kept: list[str] = []
    for segment in path.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    return "/" + "/".join(kept)


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int | None] | None:
    try:
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number
        return None


def _url_under(uri: str, prefix: str) -> bool:
    """Same scheme and host, and a path under the prefix's: an object store's key as
    written, a URL's path normalised (see `url_path`)."""
    try:
        u, p = urllib.parse.urlsplit(uri), urllib.parse.urlsplit(prefix)
    except ValueError:
        return False
    if _literal_keys(uri):
        if (u.scheme.lower(), u.netloc.lower()) != (p.scheme.lower(), p.netloc.lower()):
            return False
        return _under(u.path or "/", p.path or "/")
    origin = _origin(u)
    if origin is None or origin != _origin(p) or not origin[1]:
        return False
    return _under(url_path(u.path), url_path(p.path))
