"""The HTTP/1.1 connections of `ics serve`: uvicorn's httptools protocol, with a deadline and
a size limit on each request's line and headers, and a cap on open connections.

What the app's wrappers cannot see happens here, before a request reaches the app: uvicorn
waits for headers forever, keeps every header it is sent and accepts every connection, so
a client that sends one byte a second, headers without end, or opens connections by the
thousand would hold connections, file descriptors and memory for good. What is refused here
never reaches the app, so it is counted here (`ics_http_refused_total`).
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Callable
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .metrics import Metrics

#: Most bytes of one request's line and headers (names and values, as sent).
MAX_HEAD_BYTES = 65_536

#: File descriptors the default connection cap leaves for everything else (the store, the
#: model, logs, outbound reads, capture and alert uploads).
FD_RESERVE = 256
#: The default connection cap at most, whatever the file-descriptor limit.
MAX_CONNECTIONS_DEFAULT = 10_000


def connection_limit(configured: int | None) -> int:
    """The cap on open connections: `configured`, or by default the process's open-file
    limit (RLIMIT_NOFILE, soft) less FD_RESERVE, within 32 and MAX_CONNECTIONS_DEFAULT."""
    if configured is not None:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_DEFAULT
    return max(32, min(MAX_CONNECTIONS_DEFAULT, soft - FD_RESERVE))


#: The answer to a connection over the cap: made once, written as it is.
_BUSY = json.dumps(
    {
        "error": {
            "type": "TooManyConnections",
            "message": "the server has as many connections open as it may (max_connections); "
            "retry shortly",
        }
    }
).encode()
_BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    + f"content-length: {len(_BUSY)}\r\n".encode()
    + b"retry-after: 1\r\nconnection: close\r\n\r\n"
    + _BUSY
)


class _HeadTooLarge(Exception):
    pass


def guarded_protocol(
    header_timeout_s: float,
    max_head_bytes: int = MAX_HEAD_BYTES,
    *,
    max_connections: int | None = None,
    metrics: Metrics | None = None,
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, answering 408 (and closing) to a request whose line and
    headers have not all arrived `header_timeout_s` after its first byte (or after the
    connection opened), and 431 (and closing) to one whose line and headers exceed
    `max_head_bytes`.

    With `max_connections`: a connection that would be one more than that closes the
    connection idle the longest (open, or kept alive, with no request begun on it) to make
    room, and when none is idle it is answered 503 and closed at once, unread.
    `metrics`: counts of what is refused, and the open connections.
    """
    #: The open connections, and of them those idle, the longest idle first.
    open_connections: set[HttpToolsProtocol] = set()
    idle: dict[HttpToolsProtocol, None] = {}

    def counter(reason: str) -> Callable[[], None]:
        if metrics is None:
            return lambda: None
        return metrics.refused.labels(reason).inc

    count_malformed, count_timeout = counter("malformed"), counter("header_timeout")
    count_too_large, count_limit = counter("header_too_large"), counter("connection_limit")
    count_idle_closed = counter("idle_closed")
    if metrics is not None:
        metrics.track_connections(lambda: len(open_connections))

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0
        #: Bytes received since the current head began, as they came (see data_received).
        _head_raw = 0
        _in_head = True
        _head_timer: asyncio.TimerHandle | None = None
        _too_large = False
        _turned_away = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            open_connections.add(self)
            over = max_connections is not None and len(open_connections) > max_connections
            if over and not self._close_an_idle_one():
                self._turned_away = True
                count_limit()
                transport.write(_BUSY_ANSWER)
                transport.close()
                return
            idle[self] = None
            self._start_head_clock()

        def connection_lost(self, exc: Exception | None) -> None:
            open_connections.discard(self)
            idle.pop(self, None)
            self._stop_head_clock()
            super().connection_lost(exc)

        def _close_an_idle_one(self) -> bool:
            """Close the connection idle the longest; False when none is."""
            while idle:
                oldest = next(iter(idle))
                del idle[oldest]
                if not oldest.transport.is_closing():
                    count_idle_closed()
                    oldest.transport.close()
                    return True
            return False

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                idle.pop(self, None)
                idle[self] = None  # kept alive for the next request: idle, the newest

        def data_received(self, data: bytes) -> None:
            if self._turned_away:
                return
            idle.pop(self, None)
            # httptools calls on_header only once a header has ended, and until then joins
            # each chunk of it onto the last: one header that never ends would grow without
            # bound. So the head is also counted as it arrives, a chunk at a time.
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                self._head_raw += len(data)
                if self._head_raw > max_head_bytes:
                    self._refuse_too_large()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            self._head_raw = 0
            self._in_head = True
            if self._head_timer is None:
                self._start_head_clock()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._stop_head_clock()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to a parse error, which _count's exception is.
            if not self._too_large:
                count_malformed()
                super().send_400_response(msg)
            else:
                self._refuse_too_large()

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > max_head_bytes:
                self._too_large = True
                raise _HeadTooLarge  # httptools stops parsing; uvicorn calls send_400_response

        def _refuse_too_large(self) -> None:
            if not self.transport.is_closing():
                count_too_large()
            if self.cycle is not None and not self.cycle.response_complete:
                # Pipelined behind a request still answering: no answer can go in order.
                self.transport.close()
                return
            self._refuse(
                431,
                "RequestHeaderFieldsTooLarge",
                f"the request line and headers are over {max_head_bytes:,} bytes",
            )

        def _start_head_clock(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _stop_head_clock(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            count_timeout()
            if self.cycle is not None and not self.cycle.response_complete:
                # Pipelined behind a request still answering: no answer can go in order.
                self.transport.close()
                return
            self._refuse(
                408,
                "RequestTimeout",
                "the request line and headers did not all arrive within "
                f"header_timeout_s={header_timeout_s:g}",
            )

        def _refuse(self, status: int, kind: str, message: str) -> None:
            if self.transport.is_closing():
                return
            body = json.dumps({"error": {"type": kind, "message": message}}).encode()
            phrase = HTTPStatus(status).phrase
            head = (
                f"HTTP/1.1 {status} {phrase}\r\n"
                "content-type: application/json\r\n"
                f"content-length: {len(body)}\r\n"
                "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode("ascii") + body)
            self.transport.close()

    return GuardedHttpToolsProtocol
