"""Hostile HTTP clients, for the soak (benchmarks.soak): N clients that misbehave against a
loopback server for a fixed time, each over and over, in five kinds taken in turn.

- `slow-headers`: a request line and headers sent one byte a second, never finished;
- `slow-body`: a SigV4 request by the server's (public) access key id with a made-up
  signature, declaring a 5 MB body sent 1 KB a second: the server must read it to refute it;
- `fake-signature`: a made-up SigV4 signature by an unknown key, with a 1 MB body, sent in
  one piece (the same request, made afresh once a minute);
- `random-method`: methods the HTTP parser knows but the app does not route, and made-up
  ones, on made-up paths;
- `huge-length`: Content-Length 10^12, or 19 MB under a plausible signature, and no body.

    python -m benchmarks.hostile URL --clients 200 --duration-s 60 --access-key-id KEY

Prints one JSON line: per kind, the attempts and the answers by status (0: the connection
ended without one). Loopback only. The generator shares the server's cores in the soak, so
what it sends is made once where it can be (bodies, a forged request), not per attempt.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import time
from collections import Counter
from urllib.parse import urlsplit

from .server_load import check_loopback

KINDS = ("slow-headers", "slow-body", "fake-signature", "random-method", "huge-length")
#: Methods the HTTP parser (llhttp) accepts, which reach the app, and two it refuses.
METHODS = ("PROPFIND", "MKCOL", "LOCK", "PURGE", "REPORT", "SEARCH", "TRACE", "LINK", "XYZZY")
#: The body of a made-up signature: made once, so the clients' own CPU goes to the server.
FAKE_BODY = random.Random(0).randbytes(1_000_000)
#: What a slow body drips, 1 KB a second: made once too (5 MB made per attempt cost the
#: generator more CPU than every other kind together, in page faults).
SLOW_BODY = bytes(5_000_000)
#: Seconds between one attempt's end and the next of the same client.
PAUSE_S = 0.5
#: Seconds a made-up signature's request is sent again as it is before it is made afresh.
FORGED_FOR_S = 60.0


def plausible_sigv4(key_id: str, region: str = "us-east-1") -> dict[str, str]:
    """SigV4 headers by `key_id`, fresh, for the sagemaker service: all the headers can
    show; only the body can refute the (random) signature."""
    now = dt.datetime.now(dt.UTC)
    day = now.strftime("%Y%m%d")
    return {
        "X-Amz-Date": now.strftime("%Y%m%dT%H%M%SZ"),
        "Authorization": f"AWS4-HMAC-SHA256 Credential={key_id}/{day}/{region}/sagemaker/"
        f"aws4_request, SignedHeaders=host;x-amz-date, Signature={random.randbytes(32).hex()}",
    }


class Hostile:
    def __init__(self, url: str, key_id: str, deadline: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.netloc = parts.netloc
        self.key_id = key_id
        self.deadline = deadline
        self.attempts: Counter[str] = Counter()
        self.answers: dict[str, Counter[int]] = {k: Counter() for k in KINDS}
        self._forged: tuple[float, bytes] | None = None

    def head(self, method: str, path: str, **headers: str) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.netloc}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    async def client(self, kind: str) -> None:
        attempt = {
            "slow-headers": self.slow_headers,
            "slow-body": self.slow_body,
            "fake-signature": self.fake_signature,
            "random-method": self.random_method,
            "huge-length": self.huge_length,
        }[kind]
        while self.left() > 0:
            self.attempts[kind] += 1
            try:
                status = await asyncio.wait_for(attempt(), timeout=max(self.left(), 0.01))
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status = 0
            except TimeoutError:
                return  # the soak's time is up
            self.answers[kind][status] += 1
            await asyncio.sleep(PAUSE_S)

    async def _exchange(
        self, start: bytes, drip: bytes = b"", every_s: float = 1.0, step: int = 1
    ) -> int:
        """Send `start`, then `drip` `step` bytes every `every_s`, reading the answer
        meanwhile: its status, or 0 when the connection ends without one."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(start)
            await writer.drain()
            answer = asyncio.ensure_future(reader.readline())
            view = memoryview(drip)
            for i in range(0, len(drip), step):
                done, _ = await asyncio.wait({answer}, timeout=every_s)
                if done:
                    break
                writer.write(view[i : i + step])
                await writer.drain()
            line = await answer
            parts = line.split()
            return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
        finally:
            writer.close()

    async def slow_headers(self) -> int:
        rest = b"X-Slow: " + b"a" * 10_000 + b"\r\n\r\n"
        return await self._exchange(b"GET /v1/executions HTTP/1.1\r\n", rest)

    async def slow_body(self) -> int:
        start = self.head(
            "POST",
            "/invocations",
            **plausible_sigv4(self.key_id),
            **{"Content-Type": "image/jpeg", "Content-Length": str(len(SLOW_BODY))},
        )
        return await self._exchange(start, SLOW_BODY, every_s=1.0, step=1024)

    async def fake_signature(self) -> int:
        return await self._exchange(self.forged())

    def forged(self) -> bytes:
        """A request signed by an unknown key, headers and body in one piece: made afresh
        once a minute (its X-Amz-Date stays fresh) and sent as it is meanwhile, so that
        the generator does not join 1 MB per attempt."""
        now = time.monotonic()
        if self._forged is None or now - self._forged[0] > FORGED_FOR_S:
            start = self.head(
                "POST",
                "/invocations",
                **plausible_sigv4("AKIANOTTHEKEY0000000"),
                **{"Content-Type": "image/jpeg", "Content-Length": str(len(FAKE_BODY))},
            )
            self._forged = (now, start + FAKE_BODY)
        return self._forged[1]

    async def random_method(self) -> int:
        method = random.choice(METHODS)
        path = f"/{random.choice(['v1', 'v2', 'x'])}/{random.randbytes(4).hex()}"
        return await self._exchange(self.head(method, path))

    async def huge_length(self) -> int:
        if random.random() < 0.5:
            start = self.head("POST", "/v1/classify", **{"Content-Length": str(10**12)})
        else:
            start = self.head(
                "POST",
                "/invocations",
                **plausible_sigv4(self.key_id),
                **{"Content-Length": "19000000"},
            )
        return await self._exchange(start)


async def run(url: str, clients: int, duration_s: float, key_id: str) -> dict[str, object]:
    hostile = Hostile(url, key_id, time.monotonic() + duration_s)
    await asyncio.gather(*(hostile.client(KINDS[i % len(KINDS)]) for i in range(clients)))
    return {
        "clients": clients,
        "duration_s": duration_s,
        "kinds": {
            k: {
                "clients": len(range(i, clients, len(KINDS))),
                "attempts": hostile.attempts[k],
                "answers": {str(s): n for s, n in sorted(hostile.answers[k].items())},
            }
            for i, k in enumerate(KINDS)
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Hostile clients against a loopback server.")
    p.add_argument("url")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--access-key-id", required=True, help="the server's SigV4 access key id")
    args = p.parse_args(argv)
    check_loopback(args.url)
    doc = asyncio.run(run(args.url, args.clients, args.duration_s, args.access_key_id))
    print(json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
