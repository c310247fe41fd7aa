"""The HTTP service in tests: in process (httpx against the ASGI app, with its lifespan) and as
a real `ics serve` process on a loopback port."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from cli import ICS_BIN


@asynccontextmanager
async def client_of(app: FastAPI, **headers: str) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the app in process, its lifespan (model, store) running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://ics.test", headers=headers, timeout=60.0
        ) as client:
            yield client


async def finished(
    client: httpx.AsyncClient, execution_id: str, deadline_s: float = 120.0
) -> dict[str, Any]:
    """The execution, through the API, once it has ended; fails after deadline_s."""
    deadline = time.monotonic() + deadline_s
    while True:
        r = await client.get(f"/v1/executions/{execution_id}")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        if doc["status"] != "RUNNING":
            return doc
        assert time.monotonic() < deadline, f"{execution_id} still RUNNING: {doc}"
        await asyncio.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Served:
    """A running `ics serve`: its process, base URL, and the file its output goes to."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve_process(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0, ready: bool = True
) -> Iterator[Served]:
    """A real `ics serve` on a free loopback port, ready (GET /readyz is 200; with
    ready=False, started only: the caller calls `wait_ready`, such as after starting
    another one); its gRPC endpoint only where `args` name a --grpc-port.

    Its output goes to a file (a pipe nobody reads would fill and block it). Stopped with
    SIGTERM afterwards, killed if it does not stop within 30 s.
    """
    port = free_port()
    if "--grpc-port" not in args:
        # Off unless asked for: its default, the HTTP port + 1, may be a client's port here.
        args = (*args, "--grpc-port", "0")
    with tempfile.NamedTemporaryFile(prefix="ics-serve-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            [str(ICS_BIN), "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env=None if env is None else dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", Path(log.name))
    try:
        if ready:
            wait_ready(served, timeout)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(served: Served, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if served.proc.poll() is not None:
            raise AssertionError(
                f"ics serve exited with {served.proc.returncode}:\n{served.output()}"
            )
        try:
            if httpx.get(f"{served.url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"ics serve not ready within {timeout} s"
        time.sleep(0.1)


#: What a SageMaker route's error body carries beside ICS's `error` (the fields botocore
#: reads: `Message`, and ModelError's own).
SAGEMAKER_FIELDS = frozenset({"Message", "OriginalStatusCode", "OriginalMessage", "LogStreamArn"})


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The `{"error": {"type", "message"}}` of an error response (beside SageMaker's fields
    on its routes)."""
    doc = response.json()
    assert set(doc) - SAGEMAKER_FIELDS == {"error"}, doc
    error: dict[str, Any] = doc["error"]
    assert set(error) == {"type", "message"}, error
    return error
