"""`ics serve` as a real process against SigV4 signatures that only look valid: what can be
checked before a body is read is, and forged signatures cannot hold the memory that bodies
read before their check share."""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from serving import Served, error_of, serve_process
from test_server_hostile import COFFEE, head, is_closed, new_home, read_answer, server_env
from test_server_sagemaker import (
    ENDPOINT,
    KEY_ID,
    SECRET,
    TOKEN,
    sagemaker_runtime,
    sigv4_headers,
)

pytestmark = pytest.mark.slow

BUDGET = 4_000_000
MAX_BODY = 1_500_000  # one address may hold max(BUDGET / 4, MAX_BODY) = 1.5 MB


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Served]:
    env = server_env(
        new_home(tmp_path_factory, models_dir),
        ICS_API_TOKEN=TOKEN,
        ICS_SIGV4_ACCESS_KEY_ID=KEY_ID,
        ICS_SIGV4_SECRET_ACCESS_KEY=SECRET,
        ICS_UNAUTHENTICATED_BODY_MEMORY=str(BUDGET),
        ICS_MAX_BODY_BYTES=str(MAX_BODY),
        ICS_BODY_TIMEOUT_S="30",
    )
    with serve_process(env=env) as s:
        yield s


def connect_from(served: Served, address: str) -> socket.socket:
    """A connection to the server from this loopback address (each one a client of its own)."""
    parts = urlsplit(served.url)
    return socket.create_connection(
        (parts.hostname or "", parts.port or 80), timeout=10, source_address=(address, 0)
    )


def hash_signed_headers(url: str, body: bytes, *, secret: str = SECRET) -> dict[str, str]:
    """botocore's own SigV4 headers for a POST of body, with X-Amz-Content-SHA256 signed."""
    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={
            "Content-Type": "application/x-image",
            "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest(),
        },
    )
    timestamp = dt.datetime.now(dt.UTC).strftime(SIGV4_TIMESTAMP)
    request.context["timestamp"] = timestamp
    request.headers["X-Amz-Date"] = timestamp
    auth = SigV4Auth(Credentials(KEY_ID, secret), "sagemaker", "us-east-1")
    signature = auth.signature(
        auth.string_to_sign(request, auth.canonical_request(request)), request
    )
    signed = auth.signed_headers(auth.headers_to_sign(request))
    assert "x-amz-content-sha256" in signed.split(";"), signed
    return {
        "Content-Type": "application/x-image",
        "X-Amz-Date": timestamp,
        "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest(),
        "Authorization": f"AWS4-HMAC-SHA256 Credential={auth.scope(request)}, "
        f"SignedHeaders={signed}, Signature={signature}",
    }


def refused_at_once(served: Served, address: str, headers: dict[str, str]) -> bytes:
    """Sends only the head of a POST to the endpoint with a 1.4 MB body declared, and
    asserts it is answered 403 and closed, unread; the answer's body."""
    sock = connect_from(served, address)
    try:
        sock.sendall(head("POST", ENDPOINT, served, **headers, **{"Content-Length": "1400000"}))
        status, answer_headers, body = read_answer(sock, within=2)
        assert status == 403, body
        assert answer_headers["connection"] == "close"
        assert is_closed(sock, within=5)
        return body
    finally:
        sock.close()


def test_a_signed_payload_hash_is_checked_before_the_body(served: Served) -> None:
    url = f"{served.url}{ENDPOINT}"
    signed = hash_signed_headers(url, COFFEE)
    r = httpx.post(url, content=COFFEE, headers=signed, timeout=30)
    assert r.status_code == 200, r.text
    # The same headers with another body: the signature holds, the body is not the one signed.
    other = COFFEE[:-1] + b"\0"
    r = httpx.post(url, content=other, headers=signed, timeout=30)
    assert r.status_code == 403, r.text
    assert "not the one signed" in error_of(r)["message"]
    # A forged signature over a declared hash is refuted from the headers: nothing is read.
    forged = hash_signed_headers(url, COFFEE, secret="not-the-secret")
    refused_at_once(served, "127.0.0.9", forged)
    # ... and is not held against the address: it never took any memory.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.9")) as client:
        r = client.post(url, content=COFFEE, headers=hash_signed_headers(url, COFFEE), timeout=30)
        assert r.status_code == 200, r.text


def test_forged_signatures_cannot_hold_the_unauthenticated_budget(served: Served) -> None:
    url = f"{served.url}{ENDPOINT}"
    # Signed by the configured key, of another body: only the whole body refutes it.
    forged = sigv4_headers(url, b"another body")
    declared = {**forged, "Content-Length": "1000000"}
    held: list[socket.socket] = []
    try:
        # One address holds 1.5 MB at most: its first body is read, its second refused.
        first = connect_from(served, "127.0.0.2")
        held.append(first)
        first.sendall(head("POST", ENDPOINT, served, **declared))
        with pytest.raises(TimeoutError):
            read_answer(first, within=1.0)  # being read
        second = connect_from(served, "127.0.0.2")
        held.append(second)
        second.sendall(head("POST", ENDPOINT, served, **declared))
        status, _, body = read_answer(second, within=2)
        assert status == 503, body
        assert error_of(httpx.Response(503, content=body))["type"] == "ServerBusy"
        # Another address still has room.
        third = connect_from(served, "127.0.0.3")
        held.append(third)
        third.sendall(head("POST", ENDPOINT, served, **declared))
        with pytest.raises(TimeoutError):
            read_answer(third, within=1.0)
        # The first body arrives, and its signature is refuted.
        first.sendall(b"\0" * 1_000_000)
        status, _, body = read_answer(first, within=10)
        assert status == 403, body
        third.close()  # hangs up half-way: its address is refuted too
        # Others hold more than half the budget (1.4 + 1.0 of 4 MB)...
        for address, length in (("127.0.0.4", "1400000"), ("127.0.0.5", "1000000")):
            sock = connect_from(served, address)
            held.append(sock)
            sock.sendall(head("POST", ENDPOINT, served, **forged, **{"Content-Length": length}))
            with pytest.raises(TimeoutError):
                read_answer(sock, within=1.0)
        # ... so the refuted address may not take any, even with a true signature...
        valid = sigv4_headers(url, COFFEE)
        again = connect_from(served, "127.0.0.2")
        held.append(again)
        again.sendall(head("POST", ENDPOINT, served, **valid, **{"Content-Length": "1000000"}))
        status, headers, body = read_answer(again, within=2)
        assert status == 503, body
        assert headers["retry-after"] == "1"
        assert "refuted in the last 60 s" in body.decode()
        # ... while an address that has not forged still gets the other half.
        fresh = connect_from(served, "127.0.0.6")
        held.append(fresh)
        fresh.sendall(head("POST", ENDPOINT, served, **forged, **{"Content-Length": "1000000"}))
        with pytest.raises(TimeoutError):
            read_answer(fresh, within=1.0)
    finally:
        for sock in held:
            sock.close()
    # Once the budget is free again, the refuted addresses' true signatures are served, as
    # are real boto3 clients'.
    for address in ("127.0.0.2", "127.0.0.3", "127.0.0.7"):
        with httpx.Client(transport=httpx.HTTPTransport(local_address=address)) as client:
            deadline = time.monotonic() + 10
            while True:
                r = client.post(url, content=COFFEE, headers=sigv4_headers(url, COFFEE))
                if r.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # the held bodies' connections are still closing
            assert r.status_code == 200, r.text
    client = sagemaker_runtime(served.url)
    answer = client.invoke_endpoint(
        EndpointName="ics", Body=COFFEE, ContentType="application/x-image"
    )
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
