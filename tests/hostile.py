"""A hostile HTTP server in a process of its own, for the tests of outbound reads.

Run as `python tests/hostile.py PHOTO`: it listens on a free loopback port, prints
`PORT <n>` and serves until killed. It speaks HTTP/1.0 on raw sockets so that it can
misbehave, and prints `GOT <path>` when a request arrives (tests wait on that):

- `/drip-headers`: the status line and headers one byte every 0.5 s, for an hour.
- `/drip-body`: headers at once, then a body of Content-Length 100,000 a byte a second.
- `/drip-short-body`: the same with Content-Length 1,000 (a body small enough to read).
- `/short-length`: Content-Length 10, then the whole photo (a lie: more than it said).
- `/long-length`: Content-Length 100,000, ten bytes, then nothing, connection open.
- `/huge-length`: Content-Length 10^12, then bytes until the client hangs up.
- `/redirect?to=URL`, `/public/redirect?to=URL`: 302 to URL (any host: another server, the
  client's own server).
- `/slow-once/...`: the first request for a target as `/drip-body`, any later one served.
- `/private/...`: 401 unless the request carries Basic authorization.
- any path ending in `.jpg` (`/public/coffee.jpg`, `/secret.jpg`, also reached through
  `/public/%2e%2e/secret.jpg` by a server that decodes and resolves paths, as this one
  does): the photo, with a `X-Served-Path` header naming the resolved path.
"""

from __future__ import annotations

import os
import posixpath
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

#: The request targets under /slow-once/ seen so far.
_seen: set[str] = set()
_seen_lock = threading.Lock()


def _serve(conn: socket.socket, photo: bytes) -> None:
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        target = data.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
        print(f"GOT {target}", flush=True)
        parts = urllib.parse.urlsplit(target)
        path = parts.path
        with _seen_lock:
            first_time = target not in _seen
            _seen.add(target)
        if path.startswith("/slow-once/") and first_time:
            path = "/drip-body"
        if path.startswith("/private/") and b"\r\nauthorization: basic " not in data.lower():
            path = "/unauthorized"
        try:
            if path == "/unauthorized":
                conn.sendall(b"HTTP/1.0 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            elif path == "/drip-headers":
                head = b"HTTP/1.0 200 OK\r\n" + b"X-Pad: " + b"a" * 7200 + b"\r\n\r\n"
                for byte in head:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.5)
            elif path in ("/drip-body", "/drip-short-body"):
                size = 100_000 if path == "/drip-body" else 1000
                conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
                for _ in range(size):
                    conn.sendall(b"x")
                    time.sleep(1)
            elif path == "/short-length":
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n" + photo)
            elif path == "/long-length":
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + photo[:10])
                time.sleep(3600)
            elif path == "/huge-length":
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
                while True:
                    conn.sendall(b"\xff" * 65536)
            elif path.endswith("/redirect"):
                to = urllib.parse.parse_qs(parts.query)["to"][0]
                conn.sendall(
                    f"HTTP/1.0 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n".encode()
                )
            else:
                # As a lenient server reads a path: decoded, dot segments resolved.
                resolved = posixpath.normpath(urllib.parse.unquote(path))
                if resolved.endswith(".jpg"):
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n"
                        + f"X-Served-Path: {resolved}\r\n".encode()
                        + f"Content-Length: {len(photo)}\r\n\r\n".encode()
                        + photo
                    )
                else:
                    conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass


def main() -> None:
    photo = Path(sys.argv[1]).read_bytes()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_serve, args=(conn, photo), daemon=True).start()


@dataclass
class Hostile:
    """A running hostile server: its base URL, and the request targets it has received."""

    proc: subprocess.Popen[str]
    url: str
    got: list[str]

    def wait_for(self, target: str, count: int = 1, timeout: float = 30.0) -> None:
        """Until `count` requests for target have arrived, since the server started."""
        deadline = time.monotonic() + timeout
        while self.got.count(target) < count:
            assert time.monotonic() < deadline, f"no request for {target}: {self.got}"
            time.sleep(0.05)


@contextmanager
def hostile_server(photo: Path) -> Iterator[Hostile]:
    proc = subprocess.Popen(
        [sys.executable, __file__, str(photo)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    follower: threading.Thread | None = None
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first and first[0] == "PORT", first
        hostile = Hostile(proc, f"http://127.0.0.1:{first[1]}", [])
        out = proc.stdout

        def follow() -> None:
            for line in out:
                if line.startswith("GOT "):
                    hostile.got.append(line[4:].strip())

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        yield hostile
    finally:
        proc.kill()
        proc.wait()
        if follower is not None:
            follower.join(5)
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    main()
