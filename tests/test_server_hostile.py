"""`ics serve` as a real process under hostile clients, on raw sockets where a well-behaved
client library cannot misbehave: slow and endless headers, slow bodies, made-up signatures,
bodies that no budget allows, strange methods, JSON nested without end; and the
credentials it is configured with, each enforced."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cli import ICS_BIN
from ics_service.samples import load_photo
from ics_service.server.connections import MAX_HEAD_BYTES
from ics_service.server.metrics import METHODS
from serving import Served, error_of, serve_process
from store_backends import SKIP_ENV
from test_server_sagemaker import ENDPOINT, KEY_ID, SECRET, TOKEN, sigv4_headers

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 5.0
#: The unauthenticated body budget of the guarded server: two bodies of 2 MB.
BUDGET = 4_000_000
BEARER = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "efficientnet-lite0"


def _coffee() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(load_photo("coffee")).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


COFFEE = _coffee()


def server_env(home: Path, **settings: str) -> dict[str, str]:
    """The test run's environment without any ICS_* setting of its own, plus these."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ICS_") or k.startswith("ICS_TEST_") or k == SKIP_ENV
    }
    return {**env, "ICS_HOME": str(home), **settings}


def new_home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    home = tmp_path_factory.mktemp("home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Served]:
    """One server with a token, SigV4 keys, short header and body deadlines and a small
    unauthenticated body budget."""
    env = server_env(
        new_home(tmp_path_factory, models_dir),
        ICS_API_TOKEN=TOKEN,
        ICS_SIGV4_ACCESS_KEY_ID=KEY_ID,
        ICS_SIGV4_SECRET_ACCESS_KEY=SECRET,
        ICS_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        ICS_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        ICS_UNAUTHENTICATED_BODY_MEMORY=str(BUDGET),
    )
    with serve_process(env=env) as served:
        yield served


# --- raw HTTP/1.1 -------------------------------------------------------------------------


def connect(served: Served, source: str | None = None) -> socket.socket:
    """A connection to the server, from the loopback address `source` if given (the server
    tells clients apart by address)."""
    parts = urlsplit(served.url)
    return socket.create_connection(
        (parts.hostname or "", parts.port or 80),
        timeout=10,
        source_address=None if source is None else (source, 0),
    )


def head(method: str, path: str, served: Served, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {urlsplit(served.url).netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket, within: float) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of the next answer on sock (fails after `within` s)."""
    sock.settimeout(within)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside an answer"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def is_closed(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` s (sending nothing more)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def rss(served: Served) -> int:
    """The server process's resident memory, in bytes."""
    status = Path(f"/proc/{served.proc.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match[1]) * 1024


def healthy(served: Served) -> None:
    """The server still answers an ordinary authenticated request."""
    r = httpx.post(f"{served.url}/v1/classify", content=COFFEE, headers=BEARER, timeout=30)
    assert r.status_code == 200, r.text


# --- headers ------------------------------------------------------------------------------


def test_slow_silent_and_endless_headers_are_cut_off(guarded: Served) -> None:
    silent = connect(guarded)  # connects and says nothing
    slow = connect(guarded)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Drip: ")
    started = time.monotonic()
    dripping = True

    def drip() -> None:  # one byte every 0.2 s: each arrives well within any gap timer
        while dripping:
            try:
                slow.sendall(b"a")
            except OSError:
                return
            time.sleep(0.2)

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        for sock in (slow, silent):
            status, headers, body = read_answer(sock, within=HEADER_TIMEOUT_S + 5)
            assert status == 408, body
            assert headers["connection"] == "close"
            assert "header_timeout_s=1" in body.decode()
            assert is_closed(sock, within=5)
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 5
        healthy(guarded)  # others are served all the while
    finally:
        dripping = False
        dripper.join()
        slow.close()
        silent.close()

    # Headers without end are refused at 64 KiB, not kept: 8 KB headers, each whole.
    line = b"X-Pad-%d: " + b"p" * 8000 + b"\r\n"
    refused_at_the_limit(guarded, [line % i for i in range(2_000)])  # 16 MB, were it all taken
    healthy(guarded)


def test_one_header_that_never_ends_is_refused_at_the_limit(guarded: Served) -> None:
    # One value sent in 4 KB pieces that never ends: httptools sees no header end, so only
    # counting the bytes as they arrive can stop it (within the 1 s header deadline, which
    # would answer 408 instead).
    refused_at_the_limit(guarded, [b"X-A: "] + [b"a" * 4096] * 4096)  # 16 MB, were it all taken
    healthy(guarded)


def refused_at_the_limit(served: Served, pieces: list[bytes]) -> None:
    """Sends a request's head in these pieces, a little apart, until just past 64 KiB, and
    asserts the answer is 431 and the connection closed: nothing sent after the limit (which
    a closed connection would reset, losing the answer)."""
    sock = connect(served)
    try:
        sent = sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for piece in pieces:
            sock.sendall(piece)
            sent += len(piece)
            if sent > MAX_HEAD_BYTES:
                break
            time.sleep(0.01)
        assert sent > MAX_HEAD_BYTES
        status, headers, body = read_answer(sock, within=HEADER_TIMEOUT_S + 5)
        assert status == 431, body
        assert headers["connection"] == "close"
        assert f"over {MAX_HEAD_BYTES:,} bytes" in body.decode()
        assert is_closed(sock, within=5)
    finally:
        sock.close()


# --- bodies -------------------------------------------------------------------------------


def test_a_slow_body_gets_408_and_its_connection_closed(guarded: Served) -> None:
    signed = sigv4_headers(f"{guarded.url}{ENDPOINT}", COFFEE)
    for path, auth in (("/v1/classify", BEARER), (ENDPOINT, signed)):
        # An address whose signed body did not arrive gets half the body budget for a
        # while: from an address no other test uses.
        sock = connect(guarded, "127.0.0.5")
        try:
            headers = {**auth, "Content-Type": "image/jpeg", "Content-Length": str(len(COFFEE))}
            sock.sendall(head("POST", path, guarded, **headers) + COFFEE[:100])
            started = time.monotonic()
            status, answer_headers, body = read_answer(sock, within=BODY_TIMEOUT_S + 5)
            assert status == 408, body
            assert answer_headers["connection"] == "close"
            assert "body_timeout_s=5" in body.decode()
            assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - started < BODY_TIMEOUT_S + 5
            assert is_closed(sock, within=5)
        finally:
            sock.close()
    healthy(guarded)


def test_made_up_signatures_and_tokens_are_refused_unread(guarded: Served) -> None:
    made_up = (
        "AWS4-HMAC-SHA256 Credential=AKIANOTOURKEY0000000/20260101/us-east-1/sagemaker/"
        "aws4_request, SignedHeaders=host;x-amz-date, Signature=" + "0" * 64
    )
    for auth in (made_up, "Bearer not-the-token", ""):
        sock = connect(guarded)
        try:
            # 20 MB declared, nothing sent: the answer comes at once, from the headers.
            headers = {"Content-Length": "20000000", "Content-Type": "image/jpeg"}
            if auth:
                headers["Authorization"] = auth
            sock.sendall(head("POST", ENDPOINT, guarded, **headers))
            status, answer_headers, body = read_answer(sock, within=2)
            assert status in (401, 403), body
            assert answer_headers["connection"] == "close"
            assert is_closed(sock, within=5)
        finally:
            sock.close()


def test_unauthenticated_bodies_share_one_memory_budget(guarded: Served) -> None:
    healthy(guarded)  # warm: the first classification's own memory is not counted below
    baseline = rss(guarded)
    # A real signature by the configured key, of another body: only the whole body can
    # refute it, so it is read, within the budget.
    signed = sigv4_headers(f"{guarded.url}{ENDPOINT}", b"another body")
    request = head(
        "POST", ENDPOINT, guarded, **signed, **{"Content-Length": "2000000"}
    )  # 2 MB declared: two fit the 4 MB budget
    socks: list[socket.socket] = []
    statuses: list[int] = []
    peak = baseline
    try:
        for _ in range(100):
            sock = connect(guarded, "127.0.0.6")
            socks.append(sock)
            sock.sendall(request)
            try:
                status, headers, body = read_answer(sock, within=1.0)
            except TimeoutError:  # not refused: being read; send half of it, then stall
                sock.sendall(b"\0" * 1_000_000)
                statuses.append(0)
            else:
                assert status == 503, body
                assert headers["retry-after"] == "1"
                assert error_of_bytes(body)["type"] == "ServerBusy"
                statuses.append(status)
            peak = max(peak, rss(guarded))
        # Two held at a time (two more once a held one reaches its deadline, on a slow
        # machine); the others refused unread.
        assert 2 <= statuses.count(0) <= 4, statuses
        assert statuses.count(503) == 100 - statuses.count(0)
        healthy(guarded)  # authenticated requests are not held up
        # The two held ones end at their body deadline, and the budget is free again.
        for sock in [s for s, st in zip(socks, statuses, strict=True) if st == 0]:
            status, _, body = read_answer(sock, within=BODY_TIMEOUT_S + 5)
            assert status == 408, body
    finally:
        for sock in socks:
            sock.close()
    # 100 bodies of 1 MB were offered; at most the budget's worth was taken in.
    assert peak - baseline < 30_000_000, (baseline, peak)
    # Another address is served (this one's bodies did not arrive: half the budget for a
    # while).
    signed = sigv4_headers(f"{guarded.url}{ENDPOINT}", COFFEE)
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.7")) as client:
        r = client.post(f"{guarded.url}{ENDPOINT}", content=COFFEE, headers=signed, timeout=30)
    assert r.status_code == 200, r.text


def error_of_bytes(body: bytes) -> dict[str, str]:
    return error_of(httpx.Response(200, content=body))


# --- metrics ------------------------------------------------------------------------------


def test_strangers_cannot_grow_the_metrics(guarded: Served) -> None:
    # Methods the HTTP parser knows (each reaches the app) and some it does not.
    odd = ["PROPFIND", "MKCOL", "LOCK", "UNLOCK", "COPY", "MOVE", "PURGE", "REPORT", "SEARCH"]
    odd += ["TRACE", "CONNECT", "LINK", "UNLINK", "SOURCE", "QUERY", "ACL", "BIND", "NOTIFY"]
    odd += [f"X{i:04d}" for i in range(20)]
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        for i, method in enumerate(odd):
            try:
                client.request(method, f"/v1/classify/{i}")
                client.request(method, f"/nowhere/{i}?x={i}")
            except httpx.HTTPError:
                pass  # refused by the parser: never counted, never a label
        for i in range(20):
            client.get(f"/made/up/{i}")
        m = client.get("/metrics", headers=BEARER)
    assert m.status_code == 200
    series = [
        sample.labels
        for family in text_string_to_metric_families(m.text)
        if family.name == "ics_http_requests"
        for sample in family.samples
        if sample.name == "ics_http_requests_total"
    ]
    methods = {s["method"] for s in series}
    assert methods <= METHODS | {"other"}, methods
    assert "other" in methods
    assert {s["status"] for s in series} <= {"1xx", "2xx", "3xx", "4xx", "5xx"}
    routes = {s["route"] for s in series}
    assert "unmatched" in routes
    assert not any("/made/up/" in r or "/nowhere/" in r for r in routes), routes
    assert len(series) < 20, series


# --- JSON ---------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_in_each_protocols_shape(guarded: Served) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    nested_message = b'{"Type": "Notification", "Message": "' + b"[" * 100_000 + b'"}'
    json_type = {**BEARER, "Content-Type": "application/json"}
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        for body in (deep, b'{"uri": ' + deep + b"}", b"[" * 900 + b"]" * 900):
            r = client.post("/v1/classify", content=body, headers=json_type)
            assert r.status_code == 400, r.text
            assert error_of(r)["type"] == "UsageError"
        for path in (f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/1/infer"):
            for body in (deep, b'{"inputs": ' + b"[" * 900 + b"]" * 900 + b"}"):
                r = client.post(path, content=body, headers=json_type)
                assert r.status_code == 400, r.text
                doc = r.json()
                assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
        for body in (deep, nested_message):
            r = client.post("/v1/events", content=body, headers=json_type)
            assert r.status_code == 400, r.text
            assert error_of(r)["type"] == "BadEvent"
        # SageMaker's invocations take the body as an image, whatever it is.
        r = client.post(ENDPOINT, content=deep, headers=json_type)
        assert 400 <= r.status_code < 500, r.text
        assert r.headers["content-type"] == "application/json"
        assert error_of(r)["type"]
    healthy(guarded)


# --- credentials --------------------------------------------------------------------------


def test_an_empty_token_is_refused_at_start_up(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> None:
    env = server_env(new_home(tmp_path_factory, models_dir), ICS_API_TOKEN="")
    proc = subprocess.run(
        [str(ICS_BIN), "serve", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "api_token is empty" in proc.stderr, proc.stderr


def test_sigv4_keys_without_a_token_are_enforced(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> None:
    env = server_env(
        new_home(tmp_path_factory, models_dir),
        ICS_SIGV4_ACCESS_KEY_ID=KEY_ID,
        ICS_SIGV4_SECRET_ACCESS_KEY=SECRET,
    )
    with serve_process(env=env) as served, httpx.Client(base_url=served.url, timeout=30) as c:
        for path in ("/v1/classify", ENDPOINT, "/invocations", f"/v2/models/{MODEL}/infer"):
            r = c.post(path, content=COFFEE, headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 401, (path, r.text)
            assert "SigV4" in error_of_any(r), r.text
        for headers in (BEARER, sigv4_headers(f"{served.url}{ENDPOINT}", COFFEE, secret="x")):
            r = c.post(ENDPOINT, content=COFFEE, headers=headers)
            assert r.status_code in (401, 403), r.text
        assert c.get("/v1/executions").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/ping").status_code == 200
        signed = sigv4_headers(f"{served.url}{ENDPOINT}", COFFEE)
        r = c.post(ENDPOINT, content=COFFEE, headers=signed)
        assert r.status_code == 200, r.text
        assert len(r.json()) == 1000
    assert "only SigV4-signed SageMaker invocations" in served.output()


def error_of_any(response: httpx.Response) -> str:
    """The message of an error in either protocol's shape."""
    error = response.json()["error"]
    return error if isinstance(error, str) else str(error["message"])
