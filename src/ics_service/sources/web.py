"""http(s):// URLs: one GET per item, with timeouts, a size limit enforced while streaming,
redirects followed by hand (at most `MAX_REDIRECTS`, a loop is an error), and no request to
a link-local or cloud metadata address unless the settings allow it.

The address check runs on every hop twice: on what the host name resolves to before the
request, and on the address actually connected to before the body is read (a name that
resolves differently the second time cannot smuggle a metadata answer in).

Bodies are asked for and read as sent (``Accept-Encoding: identity``): a compressed answer
would be unpacked before its size could be checked, so one is refused. One deadline
(`timeout_s`) covers a whole read, redirects included: a server that sends a byte every
few seconds cannot hold a decode thread. URLs in messages lose their query string and
user name and password (presigned redirect targets carry credentials there).
"""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import ImageTooLarge, SourceNotFound, SourceUnavailable, SourceUnreadable

#: Redirects followed per item at most.
MAX_REDIRECTS = 5
#: Link-local ranges (where cloud metadata services answer) and AWS's IPv6 metadata address.
BLOCKED_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)

if TYPE_CHECKING:
    import httpx


class HttpSource:
    """Items at http:// and https:// URLs."""

    def __init__(self, timeout_s: float = 10.0, allow_link_local: bool = False) -> None:
        self.timeout_s = timeout_s
        self.allow_link_local = allow_link_local
        self._client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        import httpx  # here: `ics classify` of local files never pays for its import

        if self._client is None:
            # trust_env=False: no proxy from the environment may carry a request past the
            # address checks.
            self._client = httpx.Client(
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
                trust_env=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._client

    def close(self) -> None:
        """Close the connections (when `configure` replaces this source)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def list(self, spec: str) -> Iterator[str]:
        yield spec

    def read(self, uri: str, max_bytes: int) -> bytes:
        import httpx

        url = uri
        seen = {url}
        shown = shown_url(uri)
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            if time.monotonic() > deadline:
                raise SourceUnavailable(
                    f"timed out reading {shown}: redirects took over "
                    f"http_timeout_s={self.timeout_s:g} s"
                )
            self._check_host(url, uri)
            try:
                with self.client.stream("GET", url) as resp:
                    self._check_peer(resp, uri)
                    if resp.is_redirect:
                        url = _next_hop(resp, url, uri, seen)
                        continue
                    _check_status(resp, uri)
                    return _body(resp, max_bytes, deadline, self.timeout_s, uri)
            except httpx.TimeoutException as e:
                raise SourceUnavailable(f"timed out reading {shown}: {type(e).__name__}") from None
            except httpx.TransportError as e:
                if isinstance(e, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
                    raise SourceUnreadable(f"cannot read {shown}: {_why(e)}") from None
                raise SourceUnavailable(f"cannot reach {shown}: {_why(e)}") from None
            except httpx.InvalidURL as e:
                raise SourceUnreadable(f"cannot read {shown}: {_why(e)}") from None
        raise SourceUnreadable(f"{shown} redirects more than {MAX_REDIRECTS} times")

    def _check_host(self, url: str, uri: str) -> None:
        if self.allow_link_local:
            return
        host = urllib.parse.urlsplit(url).hostname
        if not host:
            raise SourceUnreadable(f"{shown_url(url)} names no host")
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise SourceUnavailable(f"cannot resolve the host of {shown_url(url)}: {e}") from None
        for info in infos:
            _refuse_blocked(str(info[4][0]), url, uri)

    def _check_peer(self, resp: httpx.Response, uri: str) -> None:
        if self.allow_link_local:
            return
        stream: Any = resp.extensions.get("network_stream")
        peer = stream.get_extra_info("server_addr") if stream is not None else None
        if peer:
            _refuse_blocked(str(peer[0]), str(resp.url), uri)


def shown_url(url: str) -> str:
    """url as messages, results and logs may show it: without user name, password, query
    string or fragment (presigned URLs carry credentials in their query)."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        hidden = "?..." if parts.query else ""
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")) + hidden
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0]


def _why(e: BaseException) -> str:
    """An httpx error's text, which can name the URL (and so its credentials), made safe."""
    text = str(e) or type(e).__name__
    return " ".join(shown_url(w) if "://" in w else w for w in text.split(" "))


def is_blocked(address: str) -> bool:
    """Whether address is link-local or a cloud metadata address (IPv4-mapped too)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in BLOCKED_NETWORKS)


def _refuse_blocked(address: str, url: str, uri: str) -> None:
    if is_blocked(address):
        via = "" if url == uri else f" (redirected to {shown_url(url)})"
        raise SourceUnreadable(
            f"refused to read {shown_url(uri)}{via}: {address} is a link-local or cloud metadata "
            "address; set http_allow_link_local to read from it"
        )


def _next_hop(resp: httpx.Response, url: str, uri: str, seen: set[str]) -> str:
    location = resp.headers.get("location")
    shown = shown_url(uri)
    if not location:
        raise SourceUnreadable(f"{shown}: HTTP {resp.status_code} redirect without a Location")
    target = str(urllib.parse.urljoin(url, str(location)))
    if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
        raise SourceUnreadable(f"{shown} redirects to {shown_url(target)}, which is not http(s)")
    if target in seen:
        raise SourceUnreadable(f"{shown} redirects in a loop (back to {shown_url(target)})")
    seen.add(target)
    return target


def _check_status(resp: httpx.Response, uri: str) -> None:
    status = resp.status_code
    shown = shown_url(uri)
    if status in (404, 410):
        raise SourceNotFound(f"no such item: {shown} (HTTP {status})")
    if status == 429 or status >= 500:
        raise SourceUnavailable(f"cannot read {shown} now: HTTP {status}")
    if status >= 400:
        raise SourceUnreadable(f"cannot read {shown}: HTTP {status}")


def _body(
    resp: httpx.Response, max_bytes: int, deadline: float, timeout_s: float, uri: str
) -> bytes:
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise SourceUnreadable(
            f"{shown_url(uri)} was sent with Content-Encoding {encoding!r} although it was "
            "asked for as is (identity); serve images uncompressed"
        )
    length = resp.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ImageTooLarge(
            f"Content-Length is {int(length):,} bytes, over max_bytes={max_bytes:,}"
        )
    chunks: list[bytes] = []
    got = 0
    # iter_raw without a chunk size: each network read as it comes, so the size and the
    # deadline are checked as often as the server sends anything.
    for chunk in resp.iter_raw():
        chunks.append(chunk)
        got += len(chunk)
        if got > max_bytes:
            raise ImageTooLarge(f"body is over max_bytes={max_bytes:,}")
        if time.monotonic() > deadline:
            raise SourceUnavailable(
                f"timed out reading {shown_url(uri)}: not read whole within "
                f"http_timeout_s={timeout_s:g} s"
            )
    return b"".join(chunks)
