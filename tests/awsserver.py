"""A real S3- and SNS-protocol server for the tests: moto in server mode, in its own process on
a loopback port (`moto_server`, package `moto[server]`).

`aws_server` (session-wide) starts it once; `aws` (per test) points the standard AWS
environment at it (endpoint, test credentials, region) and resets its state afterwards, so
boto3 and s3fs in the test, and any `ics` process it starts, talk to it as to AWS.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

#: The `moto_server` script of the environment running the tests.
MOTO_SERVER = Path(sys.executable).parent / "moto_server"
REGION = "us-east-1"


@dataclass(frozen=True)
class AwsServer:
    """A running moto server: where it listens, and the environment that points at it."""

    url: str

    def env(self) -> dict[str, str]:
        """Standard AWS variables (as botocore and s3fs read them) for this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def reset(self) -> None:
        """Forget every bucket, object and topic (moto's reset API)."""
        httpx.post(f"{self.url}/moto-api/reset", timeout=10.0).raise_for_status()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def aws_server() -> Iterator[AwsServer]:
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = AwsServer(f"http://127.0.0.1:{port}")
        try:
            deadline = time.monotonic() + 30.0
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"moto_server exited at start:\n{log.read().decode()}")
                try:
                    httpx.get(f"{server.url}/moto-api/", timeout=1.0)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        pytest.fail("moto_server did not answer within 30 s")
                    time.sleep(0.1)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def aws(aws_server: AwsServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[AwsServer]:
    """The moto server, with the AWS environment of this test pointing at it; reset after."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    for var, value in aws_server.env().items():
        monkeypatch.setenv(var, value)
    try:
        yield aws_server
    finally:
        aws_server.reset()
