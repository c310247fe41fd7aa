"""Real receivers of alerts for tests: an HTTP server that records POSTs and checks their
signatures, and a listener that accepts connections and never answers; and `serve_http`,
which serves any request handler of a test's own on a free loopback port."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def verify(secret: str, headers: dict[str, str], body: bytes, *, max_age_s: float = 300) -> bool:
    """A receiver's check of X-ICS-Signature, as docs/alerts.md shows it."""
    ts = headers.get("X-ICS-Timestamp", "")
    sig = headers.get("X-ICS-Signature", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > max_age_s:
        return False
    expected = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(sig, "sha256=" + expected)


@dataclass
class Post:
    path: str  # as the server received it: the request target, query included
    headers: dict[str, str]
    body: bytes
    signed: bool | None  # None: the receiver has no secret

    @property
    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.body)
        return doc


class WebhookReceiver:
    """An HTTP server on a thread that records every POST and answers `status`."""

    def __init__(self, port: int = 0, *, secret: str | None = None, status: int = 200) -> None:
        self.secret = secret
        self.status = status
        self.posts: list[Post] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = {k: v for k, v in self.headers.items()}
                signed = None if receiver.secret is None else verify(receiver.secret, headers, body)
                status = receiver.status
                if status == 200:
                    with receiver._lock:
                        receiver.posts.append(Post(self.path, headers, body, signed))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def docs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [p.doc for p in self.posts]

    def wait_for(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The documents once at least n arrived; fails after timeout."""
        deadline = time.monotonic() + timeout
        while len(docs := self.docs()) < n:
            assert time.monotonic() < deadline, f"{len(docs)} of {n} alerts within {timeout} s"
            time.sleep(0.05)
        return docs


@contextmanager
def webhook_receiver(
    port: int = 0, *, secret: str | None = None, status: int = 200
) -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(port, secret=secret, status=status)
    try:
        yield receiver
    finally:
        receiver.close()


class SilentListener:
    """Accepts connections on a port and never answers: a receiver that hangs."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self._closed.set()
        self.thread.join(5)
        for conn in self.connections:
            conn.close()
        self.sock.close()


@contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1 (a thread per request) and yield the server's base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
