"""`ics serve` without credentials as a real process: every body is a stranger's, and the
bodies held at once share one memory budget."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from serving import Served, error_of, serve_process
from test_server_forged_signatures import connect_from
from test_server_hostile import COFFEE, head, new_home, read_answer, server_env

pytestmark = pytest.mark.slow

XFF = "X-Forwarded-For"


def post_from(
    served: Served, address: str, length: int, held: list[socket.socket], **headers: str
) -> tuple[int, bytes] | None:
    """Sends, from this loopback address, a head declaring `length` and half the body; the
    answer, or None while the body is being read."""
    sock = connect_from(served, address)
    held.append(sock)
    request = head(
        "POST",
        "/v1/classify",
        served,
        **{"Content-Type": "image/jpeg", "Content-Length": str(length)},
        **headers,
    )
    sock.sendall(request + b"\0" * (length // 2))
    try:
        status, _, body = read_answer(sock, within=1.0)
    except TimeoutError:
        return None
    return status, body


def test_bodies_without_credentials_share_one_budget(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> None:
    env = server_env(
        new_home(tmp_path_factory, models_dir),
        ICS_UNAUTHENTICATED_BODY_MEMORY="4000000",
        ICS_MAX_BODY_BYTES="1500000",  # one address holds max(4 MB / 4, 1.5 MB) at most
    )
    with serve_process(env=env) as served:
        held: list[socket.socket] = []

        def post(address: str, length: int) -> tuple[int, bytes] | None:
            return post_from(served, address, length, held)

        try:
            assert post("127.0.0.2", 1_400_000) is None  # being read
            answer = post("127.0.0.2", 1_000_000)  # over the address's share
            assert answer is not None and answer[0] == 503, answer
            error = error_of(httpx.Response(503, content=answer[1]))
            assert error["type"] == "ServerBusy"
            assert "unauthenticated_body_memory=4,000,000" in error["message"]
            assert post("127.0.0.3", 1_400_000) is None
            assert post("127.0.0.4", 1_000_000) is None  # 3.8 MB held of 4
            answer = post("127.0.0.5", 1_000_000)
            assert answer is not None and answer[0] == 503, answer
            # A small body still fits, and is served.
            with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.6")) as c:
                r = c.post(f"{served.url}/v1/classify", content=COFFEE, timeout=30)
                assert r.status_code == 200, r.text
        finally:
            for sock in held:
                sock.close()
        # Let go of with their connections (or once whole): the whole budget is free again.
        deadline = time.monotonic() + 10
        while post("127.0.0.2", 1_400_000) is not None:
            assert time.monotonic() < deadline, "the budget was not let go of"
            time.sleep(0.1)
        assert post("127.0.0.5", 1_400_000) is None
        for sock in held:
            sock.close()
        for _ in range(3):  # whole bodies hold nothing once they have arrived
            r = httpx.post(f"{served.url}/v1/classify", content=COFFEE, timeout=30)
            assert r.status_code == 200, r.text
        big = httpx.post(f"{served.url}/v1/classify", content=b"\0" * 1_400_000, timeout=30)
        assert big.status_code not in (413, 503), big.text


def test_x_forwarded_for_is_believed_from_trusted_proxies_only(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> None:
    """A client naming another address in X-Forwarded-For is still counted as itself (it
    would otherwise take a share of the budget per made-up address); a trusted proxy's
    X-Forwarded-For names the client a request counts against."""
    home = new_home(tmp_path_factory, models_dir)
    budget = {"ICS_UNAUTHENTICATED_BODY_MEMORY": "4000000", "ICS_MAX_BODY_BYTES": "1000000"}

    def second_body(served: Served, first: str, second: str) -> tuple[int, bytes] | None:
        """Two 1 MB bodies from the proxy's address 127.0.0.1, for the two clients named."""
        held: list[socket.socket] = []
        try:
            assert post_from(served, "127.0.0.1", 900_000, held, **{XFF: first}) is None
            return post_from(served, "127.0.0.1", 900_000, held, **{XFF: second})
        finally:
            for sock in held:
                sock.close()

    with serve_process(env=server_env(home, **budget)) as served:
        answer = second_body(served, "10.0.0.1", "10.0.0.2")  # both are 127.0.0.1's
        assert answer is not None and answer[0] == 503, answer
    trusting = server_env(home, ICS_TRUSTED_PROXIES='["127.0.0.1"]', **budget)
    with serve_process(env=trusting) as served:
        assert second_body(served, "10.0.0.1", "10.0.0.2") is None  # two clients
        answer = second_body(served, "10.0.0.3", "10.0.0.3")
        assert answer is not None and answer[0] == 503, answer


def test_a_chunked_body_out_of_budget_is_503_on_every_route(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> None:
    """A body without Content-Length that runs out of the budget as it arrives is 503
    ServerBusy, also on a route whose framework parses JSON (FastAPI answered its own 400
    "error parsing the body", which tells a client not to retry)."""
    env = server_env(
        new_home(tmp_path_factory, models_dir),
        ICS_UNAUTHENTICATED_BODY_MEMORY="4000000",
        ICS_MAX_BODY_BYTES="1500000",
    )
    with serve_process(env=env) as served:
        held: list[socket.socket] = []
        try:
            for address, length in (("127.0.0.2", 1_400_000), ("127.0.0.3", 1_400_000)):
                assert post_from(served, address, length, held) is None
            assert post_from(served, "127.0.0.4", 1_000_000, held) is None  # 3.8 MB of 4
            for path in ("/v1/executions", "/v2/models/efficientnet-lite0/infer", "/v1/classify"):
                sock = connect_from(served, "127.0.0.5")
                held.append(sock)
                request = head(
                    "POST",
                    path,
                    served,
                    **{"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                )
                chunk = b"[" + b" " * 299_998 + b"]"
                sock.sendall(request + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                status, _, body = read_answer(sock, within=10.0)
                assert status == 503, (path, status, body)
                assert b"unauthenticated_body_memory=4,000,000" in body, (path, body)
        finally:
            for sock in held:
                sock.close()
