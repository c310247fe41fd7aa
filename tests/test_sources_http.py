"""http(s):// sources against a real local HTTP server in a thread."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from cli import ics
from ics_service import sources
from ics_service.errors import (
    ExitCode,
    ImageTooLarge,
    SourceNotFound,
    SourceUnavailable,
    SourceUnreadable,
)
from ics_service.sources.web import HttpSource, is_blocked

TOTAL = 200_000_000  # what the "big" answers would send if they were read to the end


class _Handler(http.server.BaseHTTPRequestHandler):
    photo: ClassVar[bytes] = b""
    #: Bytes the big answers managed to send before the client hung up, by path.
    sent: ClassVar[dict[str, int]] = {}
    done: ClassVar[dict[str, threading.Event]] = {}

    def do_GET(self) -> None:
        path = self.path
        if path == "/ok.jpg":
            self._send(200, self.photo)
        elif path in ("/missing", "/gone"):
            self._send(404 if path == "/missing" else 410, b"no")
        elif path == "/busy":
            self._send(503, b"busy")
        elif path == "/forbidden":
            self._send(403, b"no")
        elif path == "/slow":
            time.sleep(3)
            self._send(200, self.photo)
        elif path.startswith("/big"):
            self._big(declared=path == "/big-declared")
        elif m := re.fullmatch(r"/hops/(\d+)", path):
            n = int(m[1])
            self._redirect(f"/hops/{n - 1}" if n > 1 else "/ok.jpg")  # n redirects
        elif path == "/loop-a":
            self._redirect("/loop-b")
        elif path == "/loop-b":
            self._redirect("/loop-a")
        elif path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        else:
            self._send(500, b"unknown path")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _big(self, *, declared: bool) -> None:
        """A huge body, sent until the client hangs up (HTTP/1.0: no length means the body
        runs to the end of the connection)."""
        self.send_response(200)
        if declared:
            self.send_header("Content-Length", str(TOTAL))
        self.end_headers()
        sent = 0
        chunk = b"\xff" * 65536
        try:
            while sent < TOTAL:
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass
        finally:
            type(self).sent[self.path] = sent
            type(self).done.setdefault(self.path, threading.Event()).set()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def web(photos: Path) -> Iterator[str]:
    _Handler.photo = (photos / "coffee.jpg").read_bytes()
    _Handler.sent.clear()
    _Handler.done.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_reads_a_url_and_lists_it_as_one_item(web: str) -> None:
    source = HttpSource(timeout_s=5)
    assert list(sources.expand([f"{web}/ok.jpg"])) == [f"{web}/ok.jpg"]
    assert source.read(f"{web}/ok.jpg", 10_000_000) == _Handler.photo


@pytest.mark.parametrize("path", ["/missing", "/gone"])
def test_404_and_410_are_source_not_found(web: str, path: str) -> None:
    with pytest.raises(SourceNotFound, match=r"HTTP 4\d\d"):
        HttpSource(timeout_s=5).read(web + path, 10_000_000)


def test_5xx_is_transient_and_403_is_not(web: str) -> None:
    with pytest.raises(SourceUnavailable, match="HTTP 503") as caught:
        HttpSource(timeout_s=5).read(f"{web}/busy", 10_000_000)
    assert caught.value.retryable
    with pytest.raises(SourceUnreadable, match="HTTP 403"):
        HttpSource(timeout_s=5).read(f"{web}/forbidden", 10_000_000)


def test_a_slow_server_times_out_as_a_transient_error(web: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="timed out"):
        HttpSource(timeout_s=0.5).read(f"{web}/slow", 10_000_000)
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("path", ["/big-declared", "/big-streamed"])
def test_an_oversized_body_is_refused_without_reading_it_all(web: str, path: str) -> None:
    with pytest.raises(ImageTooLarge, match="over max_bytes=1,000,000"):
        HttpSource(timeout_s=5).read(web + path, 1_000_000)
    done = _Handler.done.setdefault(path, threading.Event())
    assert done.wait(10), "the server kept sending after the client gave up"
    # Far less than the 200 MB on offer went out (socket buffers hold a few MB at most).
    assert _Handler.sent[path] < TOTAL // 10


def test_redirects_are_followed_at_most_five_times_and_loops_fail(web: str) -> None:
    source = HttpSource(timeout_s=5)
    assert source.read(f"{web}/hops/5", 10_000_000) == _Handler.photo
    with pytest.raises(SourceUnreadable, match="redirects more than 5 times"):
        source.read(f"{web}/hops/6", 10_000_000)
    with pytest.raises(SourceUnreadable, match="redirects in a loop"):
        source.read(f"{web}/loop-a", 10_000_000)


def test_link_local_and_metadata_addresses_are_refused(web: str) -> None:
    source = HttpSource(timeout_s=5)
    with pytest.raises(SourceUnreadable, match=r"169\.254\.169\.254 is a link-local"):
        source.read("http://169.254.169.254/latest/meta-data/", 10_000_000)
    # Checked on every hop: a redirect cannot lead there either.
    with pytest.raises(SourceUnreadable, match=r"redirected to http://169\.254\.169\.254"):
        source.read(f"{web}/to-metadata", 10_000_000)
    for address in (
        "169.254.169.254",
        "fe80::1",
        "fe80::1%eth0",
        "fd00:ec2::254",
        "::ffff:169.254.1.1",
    ):
        assert is_blocked(address)
    for address in ("127.0.0.1", "10.0.0.1", "::1", "fd00:ec2::253", "example.org"):
        assert not is_blocked(address)


def test_classify_reads_urls_end_to_end(web: str, ics_home: Path) -> None:
    res = ics(
        "classify",
        f"{web}/ok.jpg",
        f"{web}/missing",
        f"{web}/to-metadata",
        "-o",
        "out.jsonl",
    )
    assert res.exit_code == ExitCode.FAILED, res.output
    got = {
        r["uri"]: (r["status"], r["label"], (r["error"] or {}).get("type"))
        for r in map(json.loads, Path("out.jsonl").read_text().splitlines())
    }
    assert got == {
        f"{web}/ok.jpg": ("SUCCEEDED", "espresso", None),
        f"{web}/missing": ("FAILED", None, "SourceNotFound"),
        f"{web}/to-metadata": ("FAILED", None, "SourceUnreadable"),
    }
