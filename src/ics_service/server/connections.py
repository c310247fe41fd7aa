"""The HTTP/1.1 connections of `ics serve`: uvicorn's httptools protocol, with a deadline and
a size limit on each request's line and headers.

What the app's wrappers cannot see happens here, before a request reaches the app: uvicorn
waits for headers forever and keeps every header it is sent, so a client that sends one
byte a second, or headers without end, would hold a connection and memory for good.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Most bytes of one request's line and headers (names and values, as sent).
MAX_HEAD_BYTES = 65_536


class _HeadTooLarge(Exception):
    pass


def guarded_protocol(
    header_timeout_s: float, max_head_bytes: int = MAX_HEAD_BYTES
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, answering 408 (and closing) to a request whose line and
    headers have not all arrived `header_timeout_s` after its first byte (or after the
    connection opened), and 431 (and closing) to one whose line and headers exceed
    `max_head_bytes`."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0
        #: Bytes received since the current head began, as they came (see data_received).
        _head_raw = 0
        _in_head = True
        _head_timer: asyncio.TimerHandle | None = None
        _too_large = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_head_clock()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_clock()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
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
                super().send_400_response(msg)
            else:
                self._refuse_too_large()

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > max_head_bytes:
                self._too_large = True
                raise _HeadTooLarge  # httptools stops parsing; uvicorn calls send_400_response

        def _refuse_too_large(self) -> None:
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
