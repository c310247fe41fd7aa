"""Wrappers around the app (plain ASGI middleware): the bearer token, the body limit and the
request log.

The routes know nothing of them, as Starlette builds its middleware stack by wrapping.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from .errors import error_bytes, request_path

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Given the scope and the whole body, whether a request signed with AWS SigV4 is valid.
SigV4Verifier = Callable[[Scope, bytes], bool]

#: Routes that answer without a token: liveness probes, as load balancers and SageMaker
#: call them unauthenticated.
OPEN_PATHS = frozenset({"/ping", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


async def send_error(
    scope: Scope, send: Send, status: int, kind: str, message: str, **headers: str
) -> None:
    body = error_bytes(request_path(scope), kind, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class BearerToken:
    """Every request but the open paths must carry `Authorization: Bearer TOKEN`.

    A request signed with AWS SigV4 (boto3 cannot send a bearer token) passes when
    `sigv4` says its signature is valid; its body is read to check it, then replayed. On
    `basic_paths`, HTTP Basic with the token as the password (any user) passes too: an
    SNS subscription can send nothing else.
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        *,
        open_paths: Collection[str] = OPEN_PATHS,
        sigv4: SigV4Verifier | None = None,
        basic_paths: Collection[str] = (),
    ) -> None:
        self.app = app
        self.token = token.encode()
        self.open_paths = open_paths
        self.sigv4 = sigv4
        self.basic_paths = basic_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        auth = _header(scope, b"authorization") or ""
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer":
            # Constant time: a wrong token takes as long to refuse whatever it shares.
            if hmac.compare_digest(credentials.strip().encode(), self.token):
                await self.app(scope, receive, send)
                return
            await send_error(scope, send, 403, "Forbidden", "the API token is wrong")
            return
        if scheme == "AWS4-HMAC-SHA256" and self.sigv4 is not None:
            body = await _read_body(receive)
            if self.sigv4(scope, body):
                await self.app(scope, _replay(body), send)
                return
            await send_error(scope, send, 403, "Forbidden", "the AWS SigV4 signature is not valid")
            return
        basic = scope["path"] in self.basic_paths
        if basic and scheme.lower() == "basic":
            if hmac.compare_digest(_basic_password(credentials), self.token):
                await self.app(scope, receive, send)
                return
            await send_error(scope, send, 403, "Forbidden", "the API token is wrong")
            return
        await send_error(
            scope,
            send,
            401,
            "Unauthorized",
            "this server needs an API token: send `Authorization: Bearer TOKEN`"
            + (" (or HTTP Basic with the token as the password)" if basic else ""),
            # SNS sends its endpoint URL's user and password only when challenged so.
            **{"WWW-Authenticate": 'Bearer, Basic realm="ics"' if basic else "Bearer"},
        )


def _basic_password(credentials: str) -> bytes:
    """The password of HTTP Basic credentials (base64 of USER:PASSWORD); b"" if malformed."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""
    return decoded.partition(b":")[2]


class BodyLimit:
    """Bodies over `max_bytes` are refused with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        await send_error(
            scope,
            send,
            413,
            "RequestTooLarge",
            f"the request body is over max_body_bytes={self.max_bytes:,}",
        )


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class RequestLog:
    """One log line and the request metrics per HTTP request, timed to the last byte sent.

    A plain ASGI wrapper: Starlette's `@app.middleware("http")` would copy every response
    through a stream of its own.
    """

    def __init__(self, app: ASGIApp, metrics: Any, logger: logging.Logger) -> None:
        self.app = app
        self.metrics = metrics
        self.log = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - started
            # The router names the route in the scope it was given (this very dict).
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(route, scope["method"], status, elapsed)
            self.log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed * 1e3)
