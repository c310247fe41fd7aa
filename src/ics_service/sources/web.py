"""http(s):// URLs: one GET per item under one deadline (`timeout_s`, from connect to
last byte, redirects included; the run's stop event ends it sooner), a size limit enforced
while streaming, redirects followed by hand (at most `MAX_REDIRECTS`, a loop is an error),
and no request to a link-local or cloud metadata address unless the settings allow it.

Requests go through `ics_service.fetch`, which resolves each host name once, checks every
address it resolves to and connects to those very addresses. A server's reads also pass
`confine`: every redirect target must be under its allowed_sources, or it is not followed.

Bodies are asked for and read as sent (``Accept-Encoding: identity``): a compressed answer
would be unpacked before its size could be checked, so one is refused. URLs in messages
lose their query string and user name and password (presigned URLs carry credentials
there).
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import (
    DecodeCancelled,
    ImageTooLarge,
    SourceForbidden,
    SourceNotFound,
    SourceUnavailable,
    SourceUnreadable,
)
from ..policies import transient_status
from ..redact import redact_uri

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..fetch import Fetcher, Reply

#: Redirects followed per item at most.
MAX_REDIRECTS = 5
#: Whether a redirect target may be read (a server's allowed_sources).
Confine = Callable[[str], bool]


class HttpSource:
    """Items at http:// and https:// URLs."""

    def __init__(self, timeout_s: float = 10.0, allow_link_local: bool = False) -> None:
        self.timeout_s = timeout_s
        self.allow_link_local = allow_link_local
        self._fetcher: Fetcher | None = None
        self._lock = threading.Lock()

    @property
    def fetcher(self) -> Fetcher:
        # Imported here: `ics classify` of local files never pays for httpcore's import.
        from ..fetch import Fetcher

        with self._lock:
            if self._fetcher is None:
                self._fetcher = Fetcher(allow_link_local=self.allow_link_local)
            return self._fetcher

    def close(self) -> None:
        """Close the connections (when `configure` replaces this source)."""
        with self._lock:
            if self._fetcher is not None:
                self._fetcher.close()
                self._fetcher = None

    def list(self, spec: str) -> Iterator[str]:
        yield spec

    def read(
        self,
        uri: str,
        max_bytes: int,
        *,
        stop: threading.Event | None = None,
        confine: Confine | None = None,
    ) -> bytes:
        """The body at uri. `stop` ends the read (DecodeCancelled); `confine` says which
        redirect targets may be followed (SourceForbidden for another)."""
        from .. import fetch

        url = uri
        seen = {url}
        deadline = fetch.Deadline(self.timeout_s, stop)
        fetcher = self.fetcher
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with fetcher.open(
                    "GET", url, deadline=deadline, headers={"Accept-Encoding": "identity"}
                ) as reply:
                    if reply.is_redirect:
                        url = _next_hop(reply, url, uri, seen, confine)
                        continue
                    _check_status(reply.status, uri)
                    return _body(reply, max_bytes, uri)
            except fetch.TooLarge as e:
                raise ImageTooLarge(f"{e}, over max_bytes={max_bytes:,}") from None
            except fetch.Stopped:
                raise DecodeCancelled(f"stopped while reading {redact_uri(uri)}") from None
            except fetch.TimedOut:
                raise SourceUnavailable(
                    f"timed out reading {redact_uri(uri)}: not read whole within "
                    f"http_timeout_s={self.timeout_s:g} s"
                ) from None
            except fetch.Refused as e:
                via = "" if url == uri else f" (redirected to {redact_uri(url)})"
                raise SourceUnreadable(
                    f"refused to read {redact_uri(uri)}{via}: {e}; set http_allow_link_local "
                    "to read from it"
                ) from None
            except fetch.BadRequest as e:
                raise SourceUnreadable(f"cannot read {redact_uri(url)}: {e}") from None
            except fetch.FetchError as e:
                kind = SourceUnavailable if e.transient else SourceUnreadable
                raise kind(f"cannot reach {redact_uri(url)}: {e}") from None
        raise SourceUnreadable(f"{redact_uri(uri)} redirects more than {MAX_REDIRECTS} times")


def _next_hop(reply: Reply, url: str, uri: str, seen: set[str], confine: Confine | None) -> str:
    shown = redact_uri(uri)
    target = str(urllib.parse.urljoin(url, reply.headers["location"]))
    if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
        raise SourceUnreadable(f"{shown} redirects to {redact_uri(target)}, which is not http(s)")
    if confine is not None and not confine(target):
        raise SourceForbidden(
            f"{shown} redirects to {redact_uri(target)}, which is not under any "
            "allowed_sources prefix: not followed"
        )
    if target in seen:
        raise SourceUnreadable(f"{shown} redirects in a loop (back to {redact_uri(target)})")
    seen.add(target)
    return target


def _check_status(status: int, uri: str) -> None:
    shown = redact_uri(uri)
    if status in (404, 410):
        raise SourceNotFound(f"no such item: {shown} (HTTP {status})")
    if status >= 400 and transient_status(status):
        raise SourceUnavailable(f"cannot read {shown} now: HTTP {status}")
    if status >= 300:
        raise SourceUnreadable(f"cannot read {shown}: HTTP {status}")


def _body(reply: Reply, max_bytes: int, uri: str) -> bytes:
    encoding = reply.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise SourceUnreadable(
            f"{redact_uri(uri)} was sent with Content-Encoding {encoding!r} although it was "
            "asked for as is (identity); serve images uncompressed"
        )
    return reply.body(max_bytes)
