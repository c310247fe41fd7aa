"""Outbound HTTP under one deadline, from connect to last byte.

httpx and httpcore time each socket operation on its own: a server that sends its status
line and headers a byte a second never trips a read timeout. Here each request is made
under a `Deadline` (a time limit and an optional stop event): every step of it (name
lookup, connect, TLS handshake, each write and read) waits at most what is left, in slices
of `SLICE_S`, so that a set stop event ends it within a slice. Past the limit it raises
`TimedOut`, on a stop `Stopped`; either closes the connection.

Addresses are checked where the connection is made: the host name is resolved once, every
address it resolves to is checked (link-local and cloud metadata addresses are refused
unless allowed), and the connection is made to those very addresses, so no second lookup
can lead elsewhere. TLS still verifies the certificate for the URL's host name (SNI and
Host are the URL's). No proxy from the environment is used.

A `Fetcher` keeps connections alive between requests (a reused connection was checked
when it was made). HTTP sources, webhooks and remote models each use one.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpcore

from .policies import transient_status

#: Longest wait of one socket operation before the deadline and the stop event are looked
#: at again.
SLICE_S = 0.2
#: Link-local ranges (where cloud metadata services answer) and AWS's IPv6 metadata address.
BLOCKED_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
#: Characters a request target keeps as they are; any other is percent-encoded.
_TARGET_SAFE = "/%:@!$&'()*+,;=-._~?"


class FetchError(Exception):
    """A request that got no usable answer. Messages never name the URL (callers do,
    as they may show it)."""

    #: Whether the same request may pass if made again (`policies.transient_status`).
    transient = False


class TimedOut(FetchError):
    transient = True


class Stopped(FetchError):
    """The stop event was set while the request was in flight."""


class Unreachable(FetchError):
    """No connection could be made, or the one made broke before the answer was whole."""

    transient = True


class Refused(FetchError):
    """The host resolves to an address requests may not go to."""

    def __init__(self, address: str) -> None:
        super().__init__(f"{address} is a link-local or cloud metadata address")
        self.address = address


class Untrusted(FetchError):
    """The server's TLS certificate is not valid for the host name (or not trusted)."""


class BadRequest(FetchError):
    """The URL or request cannot be sent (no host, a scheme other than http(s))."""


class TooLarge(FetchError):
    def __init__(self, size: int, declared: bool) -> None:
        said = f"Content-Length is {size:,} bytes" if declared else "body is"
        super().__init__(said)
        self.size = size
        self.declared = declared


def is_blocked(address: str) -> bool:
    """Whether address is link-local or a cloud metadata address (IPv4-mapped too)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in BLOCKED_NETWORKS)


class Deadline:
    """The time one request (redirects and retries of it included) may take, and the
    event that ends it sooner."""

    def __init__(self, timeout_s: float, stop: threading.Event | None = None) -> None:
        self.timeout_s = timeout_s
        self.stop = stop
        self.at = time.monotonic() + timeout_s

    def left(self) -> float:
        """Seconds left; Stopped or TimedOut when none are."""
        if self.stop is not None and self.stop.is_set():
            raise Stopped("stopped while waiting for the answer")
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimedOut(f"no whole answer within {self.timeout_s:g} s")
        return left

    def slice(self) -> float:
        """How long the next socket operation may wait."""
        return min(self.left(), SLICE_S)

    def narrow(self, seconds: float) -> None:
        """End at most seconds from now (the rest of an exchange given less time)."""
        self.at = min(self.at, time.monotonic() + seconds)


#: The deadline of the request the current thread is making (httpcore calls the network
#: backend on the requesting thread).
_current = threading.local()


def _deadline() -> Deadline:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is None:  # a connection used outside Fetcher.open: a bug
        raise RuntimeError("an outbound HTTP request made without a deadline")
    return deadline


def _wait(sock: socket.socket, events: int, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, events)
        return bool(sel.select(timeout))


class _Stream(httpcore.NetworkStream):
    """A connection whose every operation waits in slices of the current deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        while True:
            self._sock.settimeout(_deadline().slice())
            try:
                return self._sock.recv(max_bytes)
            except TimeoutError:
                continue
            except OSError as e:
                raise httpcore.ReadError(str(e) or type(e).__name__) from e

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        while view:
            self._sock.settimeout(_deadline().slice())
            try:
                sent = self._sock.send(view)
            except TimeoutError:
                continue
            except OSError as e:
                raise httpcore.WriteError(str(e) or type(e).__name__) from e
            view = view[sent:]

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # wrap_socket takes the connection over (the plain socket is detached): from then
        # on the TLS socket is what must be closed on a failure.
        held: socket.socket = self._sock
        try:
            sock = ssl_context.wrap_socket(
                self._sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
            held = sock
            while True:
                sock.settimeout(_deadline().slice())
                try:
                    sock.do_handshake()
                    return _Stream(sock)
                except TimeoutError:
                    continue
        except ssl.SSLCertVerificationError as e:
            held.close()
            raise Untrusted(e.verify_message or str(e)) from None
        except OSError as e:
            held.close()
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        except BaseException:
            held.close()
            raise

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":  # an idle kept-alive connection the server closed
            return self._sock.fileno() < 0 or _wait(self._sock, selectors.EVENT_READ, 0)
        return None


class _Backend(httpcore.NetworkBackend):
    """Connections to checked addresses, within the current deadline."""

    def __init__(self, allow_link_local: bool) -> None:
        self.allow_link_local = allow_link_local

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        deadline = _deadline()
        addresses = _resolve(host, port, deadline)
        if not self.allow_link_local:
            for _, address in addresses:
                if is_blocked(str(address[0])):
                    raise Refused(str(address[0]))
        last: OSError | None = None
        for family, address in addresses:
            try:
                return _Stream(_connect(family, address, deadline))
            except OSError as e:
                last = e
        raise httpcore.ConnectError(f"cannot connect to port {port}: {last}")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("unix sockets are not used")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _resolve(host: str, port: int, deadline: Deadline) -> list[tuple[int, Any]]:
    """(family, socket address) of every address host resolves to, looked up once (on a
    thread of its own, so that a slow resolver is bound by the deadline too)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [(family, (str(ip), port))]
    found: list[Any] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as e:
            found.append(e)
        finally:
            done.set()

    threading.Thread(target=lookup, name="ics-resolve", daemon=True).start()
    while not done.wait(deadline.slice()):
        pass
    if isinstance(found[0], BaseException):
        raise httpcore.ConnectError(f"cannot resolve the host name: {found[0]}")
    return [(info[0], info[4]) for info in found[0]]


def _connect(family: int, address: Any, deadline: Deadline) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise OSError(err, os.strerror(err))
        while err:
            if _wait(sock, selectors.EVENT_WRITE, deadline.slice()):
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise


@dataclass
class Reply:
    """An answer whose status and headers have arrived; its body is read on demand."""

    status: int
    reason: str
    #: Header names in lower case; the first of repeated headers.
    headers: dict[str, str]
    _response: httpcore.Response

    @property
    def is_redirect(self) -> bool:
        return self.status in (301, 302, 303, 307, 308) and "location" in self.headers

    @property
    def transient(self) -> bool:
        return transient_status(self.status)

    def chunks(self) -> Iterator[bytes]:
        """The body as the network delivers it."""
        yield from self._response.iter_stream()

    def body(self, max_bytes: int) -> bytes:
        """The whole body, or TooLarge (without reading on) once it is over max_bytes."""
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise TooLarge(int(length), declared=True)
        parts: list[bytes] = []
        got = 0
        for chunk in self.chunks():
            parts.append(chunk)
            got += len(chunk)
            if got > max_bytes:
                raise TooLarge(got, declared=False)
        return b"".join(parts)


def _target(url: str) -> tuple[str, dict[str, str]]:
    """The URL to send (without user name and password) and the headers its user
    information becomes (Basic authorization)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadRequest(f"not a URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise BadRequest(f"scheme {parts.scheme!r} is not http or https")
    if not parts.hostname:
        raise BadRequest("the URL names no host")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{port}" if port is not None else "")
    path = urllib.parse.quote(parts.path or "/", safe=_TARGET_SAFE)
    query = urllib.parse.quote(parts.query, safe=_TARGET_SAFE + "=&")
    target = urllib.parse.urlunsplit((parts.scheme.lower(), netloc, path, query, ""))
    headers: dict[str, str] = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return target, headers


class Fetcher:
    """Outbound HTTP/1.1 requests, each under a `Deadline`, over kept-alive connections."""

    def __init__(self, *, allow_link_local: bool = False, user_agent: str | None = None) -> None:
        self.allow_link_local = allow_link_local
        self.user_agent = user_agent
        self._pool: httpcore.ConnectionPool | None = None
        self._lock = threading.Lock()
        self.closed = False

    def _connections(self) -> httpcore.ConnectionPool:
        with self._lock:
            if self.closed:
                raise BadRequest("this fetcher is closed")
            if self._pool is None:
                # Made on first use: loading the CA certificates takes a few tens of ms.
                self._pool = httpcore.ConnectionPool(
                    ssl_context=httpcore.default_ssl_context(),
                    max_connections=None,
                    max_keepalive_connections=16,
                    keepalive_expiry=5.0,
                    network_backend=_Backend(self.allow_link_local),
                )
            return self._pool

    @contextmanager
    def open(
        self,
        method: str,
        url: str,
        *,
        deadline: Deadline,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> Iterator[Reply]:
        """Send the request and yield the answer once its headers are in; the body is read
        inside the block, under the same deadline. Every failure is a FetchError."""
        target, auth = _target(url)
        sent = {**auth, **(headers or {})}
        if self.user_agent is not None:
            sent.setdefault("User-Agent", self.user_agent)
        outer = getattr(_current, "deadline", None)
        _current.deadline = deadline
        try:
            deadline.left()
            with (
                _mapped(),
                self._connections().stream(
                    method,
                    target,
                    headers=list(sent.items()),
                    content=content,
                    extensions={"timeout": {"connect": None, "read": None, "write": None}},
                ) as response,
            ):
                yield Reply(
                    status=response.status,
                    reason=response.extensions.get("reason_phrase", b"").decode("latin-1"),
                    headers=_headers(response.headers),
                    _response=response,
                )
        finally:
            _current.deadline = outer

    def close(self) -> None:
        with self._lock:
            self.closed = True
            if self._pool is not None:
                self._pool.close()
                self._pool = None


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


@contextmanager
def _mapped() -> Iterator[None]:
    """httpcore's errors as FetchErrors."""
    try:
        yield
    except httpcore.TimeoutException as e:  # not expected: no operation has a timeout
        raise TimedOut(str(e) or type(e).__name__) from None
    except (httpcore.UnsupportedProtocol, httpcore.LocalProtocolError) as e:
        raise BadRequest(str(e) or type(e).__name__) from None
    except (httpcore.NetworkError, httpcore.RemoteProtocolError) as e:
        raise Unreachable(str(e) or type(e).__name__) from None
