"""Wrappers around the app (plain ASGI middleware): authentication (bearer token, SigV4,
HTTP Basic), the body limit, the body deadline and the request log.

The routes know nothing of them, as Starlette builds its middleware stack by wrapping.
Nothing is buffered for a client that has not proved who it is but a SigV4-signed body
whose signature covers it without a declared hash (boto3's), and those bodies share one
memory budget, of which one client address holds a share at most, and addresses whose
signed body was read and refuted lately half at most: forged signatures cannot take it
all from clients that sign truly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from .errors import error_answer, request_path

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SigV4Verifier(Protocol):
    """Whether a request signed with AWS SigV4 is valid (given the scope and the whole body);
    `precheck`: whether it can be, from its headers alone; `signed_payload_hash`: the body's
    hash when the signature covers a declared one, and `verify_head` the signature then."""

    def precheck(self, scope: Scope) -> bool: ...

    def signed_payload_hash(self, scope: Scope) -> str | None: ...

    def verify_head(self, scope: Scope, payload_hash: str) -> bool: ...

    def __call__(self, scope: Scope, body: bytes) -> bool: ...


#: Routes that answer without a token: liveness probes, as load balancers and SageMaker
#: call them unauthenticated.
OPEN_PATHS = frozenset({"/ping", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})

#: A body at most this large that is refused unread is left for the server to drain, so the
#: connection stays open and the client reads the answer; a larger one (or one of unknown
#: length) closes the connection, as reading it would cost the time the refusal saves.
DRAIN_BYTES = 65_536

#: Seconds a client refused for lack of body memory is told to wait (Retry-After).
BUSY_RETRY_AFTER_S = 1

#: Seconds an address whose signed body was read and refuted (or did not all arrive) is
#: held to half of the unauthenticated body budget.
REFUTED_PENALTY_S = 60.0
#: Addresses remembered so (the oldest forgotten first).
MAX_REFUTED = 4096


async def send_error(
    scope: Scope,
    send: Send,
    status: int,
    kind: str,
    message: str,
    *,
    unread: bool = False,
    **headers: str,
) -> None:
    """An error answer in the path's protocol shape. `unread`: the body was not read, and the
    connection is closed after the answer unless what is left of it is small."""
    status, body, own = error_answer(
        request_path(scope), status, kind, message, method=scope.get("method")
    )
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if unread and _large_body(scope):
        raw.append((b"connection", b"close"))
    raw += [(k.lower().encode(), v.encode()) for k, v in {**headers, **own}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _declared_length(scope: Scope) -> int | None:
    """The Content-Length, or None when absent or not a number."""
    length = _header(scope, b"content-length")
    return int(length) if length is not None and length.isdigit() else None


def _large_body(scope: Scope) -> bool:
    """Whether the request's body is over DRAIN_BYTES, or chunked (of unknown length)."""
    length = _declared_length(scope)
    if length is not None:
        return length > DRAIN_BYTES
    return _header(scope, b"transfer-encoding") is not None


class BodyBudget:
    """Bytes that bodies read before their request is authenticated may hold at once, all
    requests together, and of them one client address `per_client` at most (one event
    loop: no lock)."""

    def __init__(self, max_bytes: int, per_client: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.per_client = max_bytes if per_client is None else min(per_client, max_bytes)
        self.held = 0
        self._by_client: dict[str, int] = {}

    def take(self, n: int, client: str = "", *, ceiling: int | None = None) -> bool:
        """Hold n more bytes; False (and nothing held) when that would exceed the budget, the
        client's share, or `ceiling` (bytes held by all, this one included)."""
        mine = self._by_client.get(client, 0)
        limit = self.max_bytes if ceiling is None else min(ceiling, self.max_bytes)
        if self.held + n > limit or mine + n > self.per_client:
            return False
        self.held += n
        self._by_client[client] = mine + n
        return True

    def give(self, n: int, client: str = "") -> None:
        self.held -= n
        left = self._by_client.get(client, 0) - n
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


#: The largest body a self-guarded path (the console) reads before its route checks who
#: sent it: its forms hold a token or a CSRF value and a few fields.
SELF_GUARDED_BODY_BYTES = 16 * 1024


class Authenticate:
    """Every request but the open paths must prove who sent it, by what is configured.

    With a `token`: `Authorization: Bearer TOKEN`, and on `basic_paths` HTTP Basic with the
    token as the password (any user), as an SNS subscription can send nothing else. With
    `sigv4`: an AWS SigV4 signature of the SageMaker invocation paths (boto3 cannot send a
    bearer token). A signature covers the body, so its body is read before the check and
    replayed after: only once the headers leave it possible (`precheck`), and only while
    `budget` has room for it; otherwise it is refused unread.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        sigv4: SigV4Verifier | None,
        budget: BodyBudget,
        open_paths: Collection[str] = OPEN_PATHS,
        basic_paths: Collection[str] = (),
        self_guarded: Callable[[str, str], bool] | None = None,
    ) -> None:
        if not token and sigv4 is None:
            raise ValueError("Authenticate needs a token or a SigV4 verifier")
        self.app = app
        #: (method, path) of the routes that check their viewers themselves (the console's
        #: pages: a session cookie, or this token), reached with small bodies only (its forms).
        self.self_guarded = self_guarded
        self._small_bodies = BodyLimit(app, SELF_GUARDED_BODY_BYTES)
        self.token = token.encode() if token else None
        self.open_paths = open_paths
        self.sigv4 = sigv4
        self.budget = budget
        self.basic_paths = basic_paths
        #: Client addresses whose signed body was refuted, and until when they are refused.
        self.refuted: OrderedDict[str, float] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if self.self_guarded is not None and self.self_guarded(scope["method"], scope["path"]):
            await self._small_bodies(scope, receive, send)
            return
        auth = _header(scope, b"authorization") or ""
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and self.token is not None:
            # Constant time: a wrong token takes as long to refuse whatever it shares.
            if hmac.compare_digest(credentials.strip().encode(), self.token):
                await self.app(scope, receive, send)
                return
            await self._forbidden(scope, send, "the API token is wrong")
            return
        if scheme == "AWS4-HMAC-SHA256" and self.sigv4 is not None:
            await self._signed(scope, receive, send, self.sigv4)
            return
        basic = scope["path"] in self.basic_paths and self.token is not None
        if basic and scheme.lower() == "basic":
            if hmac.compare_digest(_basic_password(credentials), self.token or b""):
                await self.app(scope, receive, send)
                return
            await self._forbidden(scope, send, "the API token is wrong")
            return
        if self.token is None:
            message = (
                "this server accepts only AWS SigV4-signed SageMaker invocations (POST "
                "/invocations, /endpoints/NAME/invocations[-response-stream] or "
                "/endpoints/NAME/async-invocations) by its "
                "configured access key"
            )
            challenge = "AWS4-HMAC-SHA256"
        else:
            message = "this server needs an API token: send `Authorization: Bearer TOKEN`" + (
                " (or HTTP Basic with the token as the password)" if basic else ""
            )
            # SNS sends its endpoint URL's user and password only when challenged so.
            challenge = 'Bearer, Basic realm="ics"' if basic else "Bearer"
        await send_error(
            scope,
            send,
            401,
            "Unauthorized",
            message,
            unread=True,
            **{"WWW-Authenticate": challenge},
        )

    async def _signed(
        self, scope: Scope, receive: Receive, send: Send, verifier: SigV4Verifier
    ) -> None:
        if not verifier.precheck(scope):
            await self._forbidden(scope, send, "the AWS SigV4 signature is not valid")
            return
        claimed = verifier.signed_payload_hash(scope)
        if claimed is not None:
            # The signature covers a declared hash: checked now, the body against it as the
            # app reads it; nothing is held for a signature not yet proved.
            if not verifier.verify_head(scope, claimed):
                await self._forbidden(scope, send, "the AWS SigV4 signature is not valid")
                return
            await self._hash_checked(scope, receive, send, claimed)
            return
        client = _client(scope)
        now = time.monotonic()
        until = self.refuted.get(client)
        # An address refuted lately may take only the budget's first half: the rest stays
        # for addresses that have not forged.
        ceiling = self.budget.max_bytes // 2 if until is not None and until > now else None
        declared = _declared_length(scope) or 0
        if not self.budget.take(declared, client, ceiling=ceiling):
            await self._busy(scope, send, refuted=ceiling is not None)
            return
        held = declared
        valid = arrived = busy = False
        try:
            chunks = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > held:  # longer than declared (or chunked): hold as it comes
                    if not self.budget.take(size - held, client, ceiling=ceiling):
                        busy = True  # no room, not a refutation
                        await self._busy(scope, send, refuted=ceiling is not None)
                        return
                    held = size
                chunks.append(chunk)
                if not message.get("more_body", False):
                    arrived = True
                    break
            body = b"".join(chunks)
            del chunks
            valid = arrived and verifier(scope, body)
        finally:
            self.budget.give(held, client)
            if not valid and not busy:
                self._refute(client, now)
        if valid:
            await self.app(scope, _replay(body, receive), send)
            return
        await self._forbidden(scope, send, "the AWS SigV4 signature is not valid")

    def _refute(self, client: str, now: float) -> None:
        self.refuted.pop(client, None)
        self.refuted[client] = now + REFUTED_PENALTY_S
        while len(self.refuted) > MAX_REFUTED:
            self.refuted.popitem(last=False)

    async def _hash_checked(self, scope: Scope, receive: Receive, send: Send, claimed: str) -> None:
        digest = hashlib.sha256()

        def check(message: Message) -> None:
            if message["type"] == "http.request":
                digest.update(message.get("body", b""))
                if not message.get("more_body", False) and digest.hexdigest() != claimed:
                    raise _BodyRefused

        if await _watching_body(self.app, scope, receive, send, check):
            await self._forbidden(
                scope,
                send,
                "the request body is not the one signed (its SHA-256 is not the "
                "X-Amz-Content-SHA256 header's)",
            )

    async def _forbidden(self, scope: Scope, send: Send, message: str) -> None:
        await send_error(scope, send, 403, "Forbidden", message, unread=True)

    async def _busy(self, scope: Scope, send: Send, *, refuted: bool = False) -> None:
        why = (
            f" (a SigV4 signature from this address was refuted in the last "
            f"{REFUTED_PENALTY_S:g} s, so its bodies may take half of it; a signed "
            "X-Amz-Content-SHA256 is checked before the body, and takes none)"
            if refuted
            else ""
        )
        await _busy(scope, send, self.budget, why)


class _BodyRefused(Exception):
    """Raised by a body watcher (`_watching_body`): the rest of the body is not read."""


async def _watching_body(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, watch: Callable[[Message], None]
) -> bool:
    """Run the app, showing `watch` each message it receives; `watch` raises _BodyRefused
    to stop the body there. True when it did before the app began its answer (the caller
    answers instead); False otherwise. Once the body is refused, what the app answers is
    dropped: a framework that reads the body may take the refusal for a malformed body
    (FastAPI answers its own 400 "error parsing the body" for a JSON route), and the
    caller's answer goes instead. A refusal of another watcher's, outside this one, goes
    on up to that one."""
    started = refused = False

    async def watched() -> Message:
        nonlocal refused
        message = await receive()
        try:
            watch(message)
        except _BodyRefused:
            refused = True
            raise
        return message

    async def tracked(message: Message) -> None:
        nonlocal started
        if refused and not started:
            return
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, watched, tracked)
    except _BodyRefused:
        if not refused:
            raise
    return refused and not started


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


class BudgetedBodies:
    """Without credentials configured, every request body is a stranger's: while it is
    being read, each holds its bytes of `budget` (by Content-Length, or as it arrives), and
    one that finds no room is answered 503 with Retry-After, unread. Once a body has all
    arrived, its request waits as others do (max_queue), and its bytes are let go of."""

    def __init__(self, app: ASGIApp, budget: BodyBudget) -> None:
        self.app = app
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = _client(scope)
        held = _declared_length(scope) or 0
        if not self.budget.take(held, client):
            await _busy(scope, send, self.budget)
            return
        seen = 0

        def count(message: Message) -> None:
            nonlocal seen, held
            if held < 0:  # all arrived, already let go of
                return
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > held:  # longer than declared (or chunked): held as it comes
                    if not self.budget.take(seen - held, client):
                        raise _BodyRefused
                    held = seen
            if message["type"] != "http.request" or not message.get("more_body", False):
                self.budget.give(held, client)
                held = -1

        try:
            if await _watching_body(self.app, scope, receive, send, count):
                await _busy(scope, send, self.budget)
        finally:
            if held >= 0:
                self.budget.give(held, client)


async def _busy(scope: Scope, send: Send, budget: BodyBudget, why: str = "") -> None:
    await send_error(
        scope,
        send,
        503,
        "ServerBusy",
        "the server holds as many unauthenticated request bodies as it may "
        f"(unauthenticated_body_memory={budget.max_bytes:,} bytes{why}); retry shortly",
        unread=True,
        **{"Retry-After": str(BUSY_RETRY_AFTER_S)},
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
        length = _declared_length(scope)
        if length is not None and length > self.max_bytes:
            await self._refuse(scope, send, unread=True)
            return
        seen = 0

        def count(message: Message) -> None:
            nonlocal seen
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyRefused

        if await _watching_body(self.app, scope, receive, send, count):
            # The rest is unread (and chunked: the connection closes, not drained).
            await self._refuse(scope, send, unread=True)

    async def _refuse(self, scope: Scope, send: Send, *, unread: bool = False) -> None:
        await send_error(
            scope,
            send,
            413,
            "RequestTooLarge",
            f"the request body is over max_body_bytes={self.max_bytes:,}",
            unread=unread,
        )


class BodyDeadline:
    """A body must all arrive within `timeout_s` of its headers: past that, 408, the
    connection closed, and the app reads a disconnect.

    Only the body is timed: once it has all arrived, the app takes as long as it takes.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        arrived = False  # the whole body
        started = answered = False

        async def timed() -> Message:
            nonlocal arrived, answered
            if answered:
                return {"type": "http.disconnect"}
            if arrived:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                if started:  # the app answers as it reads (none does now): it ends its answer
                    arrived = True
                    return {"type": "http.disconnect"}
                answered = True
                await send_error(
                    scope,
                    send,
                    408,
                    "RequestTimeout",
                    f"the request body did not all arrive within body_timeout_s={self.timeout_s:g}",
                    Connection="close",
                )
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                arrived = True
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if answered:  # the app's answer to the disconnect it read: nobody to send it to
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed, tracked)
        except Exception:
            # What the app made of the disconnect (FastAPI: a 400), after the 408 went.
            if not answered:
                raise


def _replay(body: bytes, receive_more: Receive) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:  # what comes after the body: the client's disconnect, when it leaves
            return await receive_more()
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
