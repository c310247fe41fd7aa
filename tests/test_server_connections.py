"""`ics serve` as a real process against clients that cost it connections and log lines: a
flood of malformed requests, more connections than it may keep open."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ics_service.server.metrics import REFUSALS
from serving import Served, error_of, serve_process
from test_server_hostile import (
    BEARER,
    COFFEE,
    connect,
    head,
    is_closed,
    new_home,
    read_answer,
    server_env,
)
from test_server_sagemaker import TOKEN

pytestmark = pytest.mark.slow

CAP = 20


def refused(served: Served) -> dict[str, float]:
    """ics_http_refused_total by reason, and the open connections (`open`), from /metrics."""
    m = httpx.get(f"{served.url}/metrics", headers=BEARER, timeout=10)
    assert m.status_code == 200, m.text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(m.text):
        for sample in family.samples:
            if sample.name == "ics_http_refused_total":
                counts[sample.labels["reason"]] = sample.value
            elif sample.name == "ics_http_connections":
                counts["open"] = sample.value
    return counts


def open_fds(served: Served) -> int:
    return len(os.listdir(f"/proc/{served.proc.pid}/fd"))


def stopped_output(served: Served) -> str:
    """The server's whole output, once it has stopped (SIGTERM) and exited 0."""
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0, served.output()
    return served.output()


def test_a_flood_of_malformed_requests_is_counted_and_summarised_in_the_log(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> None:
    env = server_env(new_home(tmp_path_factory, models_dir), ICS_API_TOKEN=TOKEN)
    garbage = [b"\x00\x01\x02 nonsense\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /\x7f HTTP/1.1"]
    with serve_process(env=env) as served:
        before = refused(served)
        assert all(before[reason] == 0 for reason in REFUSALS), before
        for i in range(300):
            sock = connect(served)
            try:
                sock.sendall(garbage[i % len(garbage)] + b"\r\n\r\n")
                status, _, _ = read_answer(sock, within=5)
                assert status == 400
            finally:
                sock.close()
        # Upgrades to a protocol not served, each once a warning of uvicorn's.
        for _ in range(50):
            r = httpx.get(
                f"{served.url}/healthz",
                headers={"Connection": "Upgrade", "Upgrade": "websocket"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
        after = refused(served)
        assert after["malformed"] == 300, after  # exact, though the log is not
        r = httpx.post(f"{served.url}/v1/classify", content=COFFEE, headers=BEARER, timeout=30)
        assert r.status_code == 200, r.text
        output = stopped_output(served)
    lines = output.splitlines()
    invalid = [ln for ln in lines if "Invalid HTTP request received." in ln]
    # The first ten a minute one by one, the rest in one line that counts them.
    assert len(invalid) == 11, invalid
    assert "290 more like this in the last" in invalid[-1], invalid[-1]
    upgrades = [ln for ln in lines if "Unsupported upgrade request." in ln]
    assert len(upgrades) == 11, upgrades
    assert "40 more like this" in upgrades[-1], upgrades[-1]
    assert len(lines) < 80, output


@pytest.fixture
def capped(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Served]:
    env = server_env(
        new_home(tmp_path_factory, models_dir),
        ICS_API_TOKEN=TOKEN,
        ICS_MAX_CONNECTIONS=str(CAP),
        ICS_HEADER_TIMEOUT_S="60",  # no connection of the test ends by the header deadline
    )
    with serve_process(env=env) as served:
        yield served


def test_connections_over_the_cap_close_idle_ones_or_are_refused(capped: Served) -> None:
    served = capped
    time.sleep(0.5)  # the readiness probe's connection closed
    baseline_fds = open_fds(served)
    # Silent connections (open, nothing sent) are idle: each new one over the cap closes
    # the one idle the longest, so strangers' idle connections cannot keep others out.
    silent = [connect(served) for _ in range(3 * CAP)]
    try:
        closed = [s for s in silent[: 2 * CAP] if is_closed(s, within=5)]
        assert len(closed) == 2 * CAP
        assert not any(is_closed(s, within=0.05) for s in silent[2 * CAP + 1 :])
        # An ordinary request is served: its connection is the newest.
        r = httpx.post(f"{served.url}/v1/classify", content=COFFEE, headers=BEARER, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        for s in silent:
            s.close()
    counts = refused(served)
    assert counts["idle_closed"] >= 2 * CAP + 1, counts
    assert counts["connection_limit"] == 0, counts

    # Connections with a request begun are not idle: over the cap, a new one is refused at
    # once (503, closed, unread); the ones in the cap are served as usual.
    busy = [connect(served) for _ in range(CAP)]
    extras: list[socket.socket] = []
    try:
        for sock in busy:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)
        for _ in range(10):
            sock = connect(served)
            extras.append(sock)
            sock.sendall(head("GET", "/healthz", served))
            status, headers, body = read_answer(sock, within=5)
            assert status == 503, body
            assert headers["connection"] == "close"
            assert headers["retry-after"] == "1"
            assert error_of(httpx.Response(503, content=body))["type"] == "TooManyConnections"
            assert "max_connections" in body.decode()
            assert is_closed(sock, within=5)
        for sock in busy:  # the requests begun end, and are answered
            sock.sendall(b"\r\n")
            status, _, _ = read_answer(sock, within=5)
            assert status == 200
    finally:
        for sock in busy + extras:
            sock.close()
    r = httpx.post(f"{served.url}/v1/classify", content=COFFEE, headers=BEARER, timeout=30)
    assert r.status_code == 200, r.text
    counts = refused(served)
    assert counts["connection_limit"] == 10, counts
    # Nothing held: the open connections and file descriptors are back where they were.
    deadline = time.monotonic() + 10
    while (open_fds(served) > baseline_fds + 2 or refused(served)["open"] > 1) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert open_fds(served) <= baseline_fds + 2, (baseline_fds, open_fds(served))
    assert refused(served)["open"] == 1  # the scrape's own
    assert served.proc.poll() is None
    assert not re.search(r"Traceback|ERROR", served.output()), served.output()


def test_the_default_cap_follows_the_open_file_limit(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> None:
    """With `ulimit -n 320` and no max_connections, the cap is 320 - 256 = 64."""
    env = server_env(
        new_home(tmp_path_factory, models_dir), ICS_API_TOKEN=TOKEN, ICS_HEADER_TIMEOUT_S="60"
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (320, hard))
    try:
        context = serve_process(env=env)
        served = context.__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    busy: list[socket.socket] = []
    try:
        time.sleep(0.5)
        for _ in range(70):
            sock = connect(served)
            busy.append(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)
        answered = {}
        for i, sock in enumerate(busy):
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError):
                answered[i] = sock.recv(12)
        assert answered == {i: b"HTTP/1.1 503" for i in range(64, 70)}, answered
    finally:
        for sock in busy:
            sock.close()
        context.__exit__(None, None, None)
