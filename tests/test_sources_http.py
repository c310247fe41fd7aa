"""http(s):// sources against a real local HTTP server in a thread."""

from __future__ import annotations

import datetime as dt
import gzip
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from cli import ICS_BIN, ics, ics_process
from hostile import Hostile, hostile_server
from ics_service import sources
from ics_service.alerts.delivery import DeliveryError
from ics_service.alerts.webhook import DRAIN_S, WebhookChannel
from ics_service.config import load_settings
from ics_service.engine.execution import ExecutionRunner
from ics_service.errors import (
    DecodeCancelled,
    ExitCode,
    ImageTooLarge,
    SourceNotFound,
    SourceUnavailable,
    SourceUnreadable,
)
from ics_service.fetch import is_blocked
from ics_service.models.runtime import OnnxRuntime
from ics_service.sources.web import HttpSource
from ics_service.store import Store
from ics_service.types import ExecutionStatus
from receivers import SilentListener, serve_http, webhook_receiver
from serving import error_of, serve_process

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
        elif m := re.fullmatch(r"/status/(\d+)", path):
            self._send(int(m[1]), b"status")
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
    with serve_http(_Handler) as url:
        yield url


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
    # As records show them (`redact_uri`): each secret value hidden, the rest as written.
    with pytest.raises(SourceUnreadable) as caught:
        source.read(f"{web}/presigned", 10_000_000)
    assert _shown(
        "redirected to http://169.254.169.254/x?X-Amz-Credential=***&X-Amz-Security-Token=***)"
    ).search(str(caught.value)), caught.value
    assert "AKIASECRETKEY" not in str(caught.value) and "=tok" not in str(caught.value)
    userinfo = web.replace("http://", "http://alice:pa55word@")
    with pytest.raises(SourceNotFound) as missing:
        source.read(f"{userinfo}/missing", 10_000_000)
    assert "pa55word" not in str(missing.value)
    assert _shown(f"{userinfo.replace('pa55word', '***')}/missing").search(str(missing.value))


def test_the_address_checked_is_the_address_connected_to(
    web: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a name that resolves to a loopback address when first asked, and to
    the metadata address after. It is looked up once per connection, and the connection
    goes to the very address that was checked."""
    port = web.rsplit(":", 1)[1]
    answers = iter(["127.0.0.1"])
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.test":
            return real(host, *args, **kwargs)
        looked_up.append(address := next(answers, "169.254.169.254"))
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.test:{port}/ok.jpg"
    assert HttpSource(timeout_s=5).read(url, 10_000_000) == _Handler.photo
    assert looked_up == ["127.0.0.1"]
    with pytest.raises(SourceUnreadable, match=r"169\.254\.169\.254 is a link-local"):
        HttpSource(timeout_s=5).read(url, 10_000_000)
    assert looked_up == ["127.0.0.1", "169.254.169.254"]
    allowed = HttpSource(timeout_s=0.5, allow_link_local=True)
    with pytest.raises(SourceUnavailable):  # allowed, and nothing answers there
        allowed.read(url, 10_000_000)


# --- a hostile server in a process of its own ----------------------------------------


@pytest.fixture(scope="module")
def hostile(photos: Path) -> Iterator[Hostile]:
    with hostile_server(photos / "coffee.jpg") as server:
        yield server


@pytest.mark.parametrize("path", ["/drip-headers", "/drip-body", "/long-length"])
def test_one_deadline_covers_connect_headers_and_body(hostile: Hostile, path: str) -> None:
    """A byte a second keeps every single read within any per-read timeout: only a
    deadline over the whole exchange ends it."""
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="not read whole within http_timeout_s=1 s"):
        HttpSource(timeout_s=1).read(hostile.url + path, 10_000_000)
    assert time.monotonic() - started < 2


def test_lies_about_the_length_read_no_more_than_they_say(hostile: Hostile) -> None:
    # Said 10, sent a whole photo: the 10 bytes said are the body.
    assert len(HttpSource(timeout_s=5).read(f"{hostile.url}/short-length", 10_000_000)) == 10
    # Said a terabyte: refused from the header, nothing of it read.
    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match="Content-Length is 1,000,000,000,000 bytes"):
        HttpSource(timeout_s=5).read(f"{hostile.url}/huge-length", 10_000_000)
    assert time.monotonic() - started < 2


def test_a_stop_ends_a_read_in_flight(hostile: Hostile) -> None:
    stop = threading.Event()
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            HttpSource(timeout_s=3600).read(f"{hostile.url}/drip-headers", 10_000_000, stop=stop)
        except BaseException as e:
            outcome.append(e)

    before = hostile.got.count("/drip-headers")
    reader = threading.Thread(target=read)
    reader.start()
    hostile.wait_for("/drip-headers", before + 1)
    stopped = time.monotonic()
    stop.set()
    reader.join(5)
    assert not reader.is_alive() and time.monotonic() - stopped < 1
    assert isinstance(outcome[0], DecodeCancelled), outcome


def test_classify_ends_a_dripping_source_and_sigterm_ends_a_hung_read(
    hostile: Hostile, ics_home: Path
) -> None:
    # One deadline per attempt: two attempts of a second each, then the item FAILED.
    env = {"ICS_HTTP_TIMEOUT_S": "1", "ICS_RETRY": '{"SerializeImageData": {"max_attempts": 1}}'}
    started = time.monotonic()
    done = ics_process(
        "classify",
        f"{hostile.url}/drip-headers",
        f"{hostile.url}/public/coffee.jpg",
        "-o",
        "out.jsonl",
        env=env,
        timeout=60,
    )
    assert time.monotonic() - started < 30, done.stderr
    assert done.returncode == ExitCode.FAILED, done.stderr
    got = {
        r["uri"].rsplit("/", 1)[1]: (r["status"], (r["error"] or {}).get("type"), r["attempts"])
        for r in map(json.loads, Path("out.jsonl").read_text().splitlines())
    }
    assert got == {
        "drip-headers": ("FAILED", "SourceUnavailable", 2),
        "coffee.jpg": ("SUCCEEDED", None, 1),
    }

    # With ten minutes to read, one SIGTERM ends the hung read at once.
    before = hostile.got.count("/drip-body")
    proc = subprocess.Popen(
        [str(ICS_BIN), "classify", f"{hostile.url}/drip-body", "--name", "hung"],
        env={**os.environ, "ICS_HTTP_TIMEOUT_S": "600"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        hostile.wait_for("/drip-body", before + 1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert time.monotonic() - signalled < 5, err
    (doc,) = [e for e in json.loads(ics("executions", "list", "--json").stdout) if e["name"]]
    # The item was not read: it stays pending for a resume, not FAILED.
    assert (doc["name"], doc["status"]) == ("hung", "ABORTED"), doc
    assert not json.loads(
        ics("executions", "show", doc["execution_id"], "--json", "--results").stdout
    )["results"]


def test_serve_keeps_answering_while_uri_reads_drip(hostile: Hostile, photos: Path) -> None:
    """Twelve `uri` requests to a source that drips its headers: they end at the deadline
    (503), and requests of others are answered meanwhile, as fast as ever."""
    env = {
        **os.environ,
        "ICS_ALLOWED_SOURCES": json.dumps([f"{hostile.url}/"]),
        "ICS_HTTP_TIMEOUT_S": "3",
    }
    photo = (photos / "coffee.jpg").read_bytes()
    with serve_process(env=env) as served:
        answers: list[tuple[int, float]] = []

        def dripping() -> None:
            started = time.monotonic()
            r = httpx.post(
                f"{served.url}/v1/classify",
                json={"uri": f"{hostile.url}/drip-headers"},
                timeout=60,
            )
            answers.append((r.status_code, time.monotonic() - started))

        before = hostile.got.count("/drip-headers")
        threads = [threading.Thread(target=dripping) for _ in range(12)]
        for t in threads:
            t.start()
        # Every read thread is held.
        hostile.wait_for("/drip-headers", before + 8)
        for _ in range(5):
            started = time.monotonic()
            r = httpx.post(
                f"{served.url}/v1/classify",
                content=photo,
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 2
        for t in threads:
            t.join(30)
        # Eight at once, then the four that waited for a read thread: all within 2 × 3 s.
        assert sorted(status for status, _ in answers) == [503] * 12, answers
        assert max(took for _, took in answers) < 10, answers


def test_serve_ends_the_uri_reads_of_clients_that_left(hostile: Hostile, photos: Path) -> None:
    """Clients that ask for a dripping `uri` and leave free their read threads at once,
    long before any deadline: a read for a client still there is then answered."""
    env = {
        **os.environ,
        "ICS_ALLOWED_SOURCES": json.dumps([f"{hostile.url}/"]),
        "ICS_HTTP_TIMEOUT_S": "600",
        "ICS_REQUEST_TIMEOUT_S": "600",
    }
    with serve_process(env=env) as served:
        port = int(served.url.rsplit(":", 1)[1])
        body = json.dumps({"uri": f"{hostile.url}/drip-headers"}).encode()
        request = (
            f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        before = hostile.got.count("/drip-headers")
        # As many as there are read threads (8) and places to wait for one (32).
        for i in range(40):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request)
                if i < 8:
                    hostile.wait_for("/drip-headers", before + i + 1)
                else:
                    time.sleep(0.05)  # read, and waiting for a read thread
        # Every one of them has left: a read for a client still here is served at once.
        started = time.monotonic()
        r = httpx.post(
            f"{served.url}/v1/classify",
            json={"uri": f"{hostile.url}/public/coffee.jpg"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 10
        assert hostile.got.count("/drip-headers") - before == 40


def test_allowed_sources_hold_against_encoded_dots_and_redirects(
    hostile: Hostile, photos: Path
) -> None:
    h = hostile.url
    env = {**os.environ, "ICS_ALLOWED_SOURCES": json.dumps([f"{h}/public/"])}
    with serve_process(env=env) as served:

        def classify(uri: str) -> httpx.Response:
            return httpx.post(f"{served.url}/v1/classify", json={"uri": uri}, timeout=30)

        assert classify(f"{h}/public/coffee.jpg").status_code == 200
        # Credentials in a uri reach the read, never the result (nor the server's log).
        presigned = classify(f"{h}/public/coffee.jpg?X-Amz-Signature=S1GSECRET")
        assert _shown(f"{h}/public/coffee.jpg?X-Amz-Signature=***").fullmatch(
            presigned.json()["uri"]
        ), presigned.json()
        assert "/public/coffee.jpg?X-Amz-Signature=S1GSECRET" in hostile.got
        refused = classify(f"{h}/secret.jpg?X-Amz-Signature=S1GSECRET")
        assert refused.status_code == 403 and "X-Amz-Signature=***~" in refused.text
        _no_secret(refused.text, "a refusal")
        inside = f"{h}/public/coffee.jpg"
        assert classify(f"{h}/public/redirect?to={urllib.parse.quote(inside)}").status_code == 200
        for uri in (
            f"{h}/public/%2e%2e/secret.jpg",
            f"{h}/public/%2E%2E/secret.jpg",
            f"{h}/public/..%2fsecret.jpg",
            f"{h}/public/%252e%252e/secret.jpg",
            f"{h}/public/..;/secret.jpg",
            f"{h}/public/..\\secret.jpg",
        ):
            r = classify(uri)
            assert r.status_code == 403 and error_of(r)["type"] == "Forbidden", (uri, r.text)
        for target in (
            f"{h}/secret.jpg",  # the same host, outside the prefix
            f"{h}/public/../secret.jpg",
            h.replace("127.0.0.1", "localhost") + "/public/coffee.jpg",  # another host name
            f"{served.url}/metrics",  # the server itself
            "http://169.254.169.254/latest/meta-data/",
        ):
            r = classify(f"{h}/public/redirect?to={urllib.parse.quote(target)}")
            assert r.status_code == 403, (target, r.text)
            assert error_of(r)["type"] == "SourceForbidden", (target, r.text)
            assert "not under any allowed_sources prefix" in error_of(r)["message"]
        # A batch execution's items are held to the same rule on every hop.
        r = httpx.post(
            f"{served.url}/v1/executions",
            json={"sources": [f"{h}/public/redirect?to={urllib.parse.quote(f'{h}/secret.jpg')}"]},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        deadline = time.monotonic() + 60
        while (doc := httpx.get(f"{served.url}/v1/executions/{execution_id}").json())[
            "status"
        ] == "RUNNING":
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        results = httpx.get(f"{served.url}/v1/executions/{execution_id}/results").json()
        assert [r["error"]["type"] for r in results["results"]] == ["SourceForbidden"], results
    _no_secret(served.output(), "the server's log")
    # The secret was never asked for, by any path.
    assert not [t for t in hostile.got if "secret" in t.split("?")[0]], hostile.got


def test_a_408_is_transient_for_sources_and_webhooks_alike(web: str) -> None:
    with pytest.raises(SourceUnavailable, match="HTTP 408") as caught:
        HttpSource(timeout_s=5).read(f"{web}/status/408", 10_000_000)
    assert caught.value.retryable
    with webhook_receiver(status=408) as receiver:
        channel = WebhookChannel(receiver.url, timeout_s=5)
        with pytest.raises(DeliveryError, match="HTTP 408") as refused:
            channel.send({"alert_id": "a1"}, "t", "b")
        channel.close()
    assert refused.value.transient


def test_a_webhook_that_drips_its_answer_is_given_up_at_the_deadline(hostile: Hostile) -> None:
    channel = WebhookChannel(f"{hostile.url}/drip-headers", timeout_s=1)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="no whole answer within 1 s") as caught:
        channel.send({"alert_id": "a1"}, "t", "b")
    channel.close()
    assert time.monotonic() - started < 2 and caught.value.transient


def test_a_webhook_whose_body_drips_after_a_200_is_delivered_without_waiting(
    hostile: Hostile,
) -> None:
    """The status line decides delivery; the body after it is read for at most DRAIN_S."""
    channel = WebhookChannel(f"{hostile.url}/drip-short-body", timeout_s=20)
    started = time.monotonic()
    channel.send({"alert_id": "a1"}, "t", "b")  # delivered: no DeliveryError
    took = time.monotonic() - started
    channel.close()
    assert DRAIN_S <= took < DRAIN_S + 2, took


# --- credentials in URLs --------------------------------------------------------------

SECRETS = ("S1GSECRET", "CR3DSECRET", "PA55SECRET", "T0KSECRET")


def _no_secret(text: str, where: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} in {where}"


def _shown(uri: str) -> re.Pattern[str]:
    """The URI as records show it, each *** standing for a hidden value (*** and a digest)."""
    return re.compile(re.escape(uri).replace(re.escape("***"), r"\*\*\*~[0-9a-f]{8}"))


def _same(got: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    """got (URI, status) pairs are the expected ones, URIs as `_shown` patterns."""
    assert len(got) == len(expected), got
    for pattern, status in expected:
        assert any(_shown(pattern).fullmatch(u) and s == status for u, s in got), (pattern, got)


def test_credentials_in_urls_are_read_with_but_never_recorded(
    hostile: Hostile, ics_home: Path
) -> None:
    h = hostile.url
    presigned = f"{h}/public/coffee.jpg?X-Amz-Credential=CR3DSECRET&X-Amz-Signature=S1GSECRET&n=1"
    private = h.replace("http://", "http://alice:PA55SECRET@") + "/private/rocket.jpg"
    missing = f"{h}/public/missing.png?token=T0KSECRET"
    Path("list.txt").write_text(f"{presigned}\n{missing}\n")
    done = ics_process(
        "classify",
        private,
        "@list.txt",
        "-o",
        "out.jsonl",
        "--notify",
        f"{(Path.cwd() / 'alerts.jsonl').as_uri()}",
        "--log-level",
        "info",
        "--json",
    )
    assert done.returncode == ExitCode.FAILED, done.stderr
    # The reads had what they needed: the presigned query, the user and password.
    assert f"/public/coffee.jpg?{presigned.split('?')[1]}" in hostile.got
    results = [json.loads(line) for line in Path("out.jsonl").read_text().splitlines()]
    _same(
        [(r["uri"], r["status"]) for r in results],
        [
            (f"{h}/public/coffee.jpg?X-Amz-Credential=***&X-Amz-Signature=***&n=1", "SUCCEEDED"),
            (h.replace("http://", "http://alice:***@") + "/private/rocket.jpg", "SUCCEEDED"),
            (f"{h}/public/missing.png?token=***", "FAILED"),
        ],
    )
    _no_secret(done.stdout + done.stderr, "the command's output and INFO log")
    execution_id = results[0]["execution_id"]
    shown = ics("executions", "show", execution_id, "--json", "--results")
    _no_secret(shown.stdout, "executions show")
    assert json.loads(shown.stdout)["params"]["sources"][0].startswith("http://alice:***~")
    assert Path("alerts.jsonl").read_text().count("missing.png?token=***") >= 1
    _no_secret(Path("alerts.jsonl").read_text(), "the alert documents")
    for stored in (ics_home / "ics.db", Path(f"{ics_home}/ics.db-wal")):
        if stored.exists():
            _no_secret(stored.read_bytes().decode("latin-1"), str(stored))


def test_a_resume_lists_the_sources_again_for_the_credentials_it_never_stored(
    hostile: Hostile, ics_home: Path
) -> None:
    h = hostile.url

    def interrupted(*sources: str) -> str:
        """An execution stopped while its one item's read hangs: its id."""
        before = len(hostile.got)
        proc = subprocess.Popen(
            [str(ICS_BIN), "classify", *sources, "--json"],
            env={**os.environ, "ICS_HTTP_TIMEOUT_S": "600"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not any("/slow-once/" in t for t in hostile.got[before:]):
                assert time.monotonic() < deadline, hostile.got
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == ExitCode.INTERRUPTED, err
        listed = json.loads(ics("executions", "list", "--json").stdout)
        return str(listed[0]["execution_id"])

    # A manifest of presigned URLs: listed again, it gives the credentials back.
    presigned = f"{h}/slow-once/coffee.jpg?X-Amz-Signature=S1GSECRET"
    Path("list.txt").write_text(presigned + "\n")
    execution_id = interrupted("@list.txt")
    resumed = ics_process("executions", "resume", execution_id, "--json")
    assert resumed.returncode == ExitCode.OK, resumed.stderr
    assert hostile.got.count(presigned.removeprefix(h)) == 2
    shown = json.loads(ics("executions", "show", execution_id, "--json", "--results").stdout)
    _same(
        [(r["uri"], r["status"]) for r in shown["results"]],
        [(f"{h}/slow-once/coffee.jpg?X-Amz-Signature=***", "SUCCEEDED")],
    )
    # A SOURCE with credentials in its own URL cannot be listed again: a clear refusal.
    execution_id = interrupted(f"{h}/slow-once/rocket.jpg?sig=S1GSECRET")
    refused = ics_process("executions", "resume", execution_id)
    assert refused.returncode == ExitCode.USAGE, refused.stderr
    assert "cannot be resumed" in refused.stderr and "new --name" in refused.stderr
    _no_secret(refused.stderr, "the refusal")


def test_urls_that_differ_only_in_a_secret_stay_two_items_each_read_with_its_own(
    hostile: Hostile, ics_home: Path
) -> None:
    h = hostile.url
    cat, dog = (f"{h}/public/img.jpg?key=CAT{s}&sig=S1GSECRET" for s in ("A", "B"))
    Path("list.txt").write_text(f"{cat}\n{dog}\n")
    done = ics_process("classify", "@list.txt", "-o", "out.jsonl", "--json")
    assert done.returncode == ExitCode.OK, done.stderr
    # Each item was read with its own query, not one of them twice.
    for uri in (cat, dog):
        assert hostile.got.count(uri.removeprefix(h)) == 1, hostile.got
    results = [json.loads(line) for line in Path("out.jsonl").read_text().splitlines()]
    uris = {r["uri"] for r in results}
    assert len(results) == 2 == len(uris), results
    for uri in uris:
        assert _shown(f"{h}/public/img.jpg?key=***&sig=***").fullmatch(uri), uri
    _no_secret(Path("out.jsonl").read_text(), "the results")


def test_credentials_are_let_go_of_as_their_items_finish(
    hostile: Hostile, ics_home: Path, runtime: OnnxRuntime
) -> None:
    h = hostile.url
    Path("list.txt").write_text(
        "".join(f"{h}/public/{i}.jpg?X-Amz-Signature=S1GSECRET{i}\n" for i in range(12))
    )
    settings = load_settings(None, {"batch_size": 2}).settings
    store = Store(settings.store_url)
    try:
        runner = ExecutionRunner(settings, store, runtime)
        execution, _ = runner.start(["@list.txt"])
        held: list[int] = []
        finished = runner.run(
            execution,
            on_results=lambda _r: held.append(len(runner._secrets.get(execution.id, {}))),
        )
    finally:
        store.close()
    assert finished.status is ExecutionStatus.SUCCEEDED, finished
    # Each URI with credentials is held until its item's result, no longer.
    assert len(held) > 1 and held[-1] == 0, held


# --- https ------------------------------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for `localhost` (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_https_is_verified_for_the_name_and_its_handshake_is_under_the_deadline(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpcore

    cert, key = _self_signed(tmp_path)
    _Handler.photo = (photos / "coffee.jpg").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert, key)
    server.socket = served.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # The test's CA stands in for the public ones (certifi) the product trusts.
    trusted = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(httpcore, "default_ssl_context", lambda: trusted)
    port = server.server_address[1]
    silent = SilentListener()
    try:
        source = HttpSource(timeout_s=1)
        assert source.read(f"https://localhost:{port}/ok.jpg", 10_000_000) == _Handler.photo
        # Connected by address, the certificate (for localhost) is not valid: a refusal,
        # not retried.
        with pytest.raises(SourceUnreadable, match=r"not valid for '127\.0\.0\.1'"):
            source.read(f"https://127.0.0.1:{port}/ok.jpg", 10_000_000)
        # A server that accepts and never answers the handshake: the deadline ends it.
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match="not read whole within"):
            source.read(f"https://127.0.0.1:{silent.port}/ok.jpg", 10_000_000)
        assert time.monotonic() - started < 2
        source.close()
    finally:
        silent.close()
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
