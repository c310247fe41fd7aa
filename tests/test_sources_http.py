"""http(s):// sources against a real local HTTP server in a thread."""

from __future__ import annotations

import gzip
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
from ics_service.sources import web as web_source
from ics_service.sources.web import HttpSource, is_blocked

TOTAL = 200_000_000  # what the "big" answers would send if they were read to the end


class _Handler(http.server.BaseHTTPRequestHandler):
    photo: ClassVar[bytes] = b""
    #: The Accept-Encoding of every request, in order.
    encodings: ClassVar[list[str | None]] = []
    #: Bytes the big answers managed to send before the client hung up, by path.
    sent: ClassVar[dict[str, int]] = {}
    done: ClassVar[dict[str, threading.Event]] = {}

    def do_GET(self) -> None:
        path = self.path
        type(self).encodings.append(self.headers.get("Accept-Encoding"))
        if path == "/gzip":
            # 100 MB of zeros in 100 KB: unpacked, it would pass any max_bytes.
            body = gzip.compress(b"\0" * 100_000_000, compresslevel=1)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):  # a byte every 0.2 s: each read well within a timeout
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif path == "/presigned":
            self._redirect(
                "http://169.254.169.254/x?X-Amz-Credential=AKIASECRETKEY&X-Amz-Security-Token=tok"
            )
        elif path == "/ok.jpg":
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
    _Handler.encodings.clear()
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


def test_bodies_are_asked_for_as_sent_and_a_compressed_answer_is_refused(web: str) -> None:
    source = HttpSource(timeout_s=5)
    with pytest.raises(SourceUnreadable, match="Content-Encoding 'gzip'"):
        source.read(f"{web}/gzip", 1_000_000)
    assert source.read(f"{web}/ok.jpg", 10_000_000) == _Handler.photo
    assert _Handler.encodings == ["identity", "identity"]


def test_one_deadline_covers_the_whole_read(web: str) -> None:
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="not read whole within http_timeout_s=1 s"):
        HttpSource(timeout_s=1).read(f"{web}/drip", 10_000_000)
    assert time.monotonic() - started < 3  # the server would take 20 s


def test_messages_show_urls_without_credentials(web: str) -> None:
    source = HttpSource(timeout_s=5)
    with pytest.raises(
        SourceUnreadable, match=r"redirected to http://169\.254\.169\.254/x\?\.\.\.\)"
    ):
        source.read(f"{web}/presigned", 10_000_000)
    userinfo = web.replace("http://", "http://alice:pa55word@")
    with pytest.raises(SourceNotFound) as caught:
        source.read(f"{userinfo}/missing", 10_000_000)
    assert "pa55word" not in str(caught.value) and "alice" not in str(caught.value)
    assert f"{web}/missing" in str(caught.value)


def test_the_connected_address_is_checked_again(web: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name resolved to a public address when checked, then connected to
    a blocked one (played here by the loopback address, blocked for the test)."""
    source = HttpSource(timeout_s=5)
    monkeypatch.setattr(source, "_check_host", lambda url, uri: None)
    real = web_source.is_blocked
    monkeypatch.setattr(web_source, "is_blocked", lambda a: a == "127.0.0.1" or real(a))
    with pytest.raises(SourceUnreadable, match=r"127\.0\.0\.1 is a link-local"):
        source.read(f"{web}/ok.jpg", 10_000_000)
    allowed = HttpSource(timeout_s=5, allow_link_local=True)
    assert allowed.read(f"{web}/ok.jpg", 10_000_000) == _Handler.photo
