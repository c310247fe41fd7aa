"""A load generator for an image classification server: POST each JPEG of a folder as a raw
body, from N concurrent clients, and measure throughput and per-request latency.

One pass sends every image of the folder once, the clients sharing the work (each takes
the next image when its last answer came). Loopback only; it stops by itself after the
pass, or after --max-s seconds, whichever comes first. The images are read into memory
before the clock starts, so the disk is not measured.

    python -m benchmarks.server_load URL FOLDER [--clients 32] [--path /v1/classify]
                                     [--max-s 300] [--out answers.jsonl]
    python -m benchmarks.server_load grpc://127.0.0.1:PORT FOLDER --model NAME [--clients 32]

A grpc:// URL sends each image as KServe's ModelInfer (the Open Inference Protocol over gRPC,
as `tritonclient.grpc` sends it: one BYTES input, the JPEG in raw_input_contents) on one
HTTP/2 channel shared by the clients, through grpcio's asyncio API and ICS's own message
classes; the answer's probabilities give the label index and confidence.

Prints one JSON line on stdout: clients, requests, ok, errors (and a few error samples),
wall_s, images_per_s (answered OK per second of the pass), p50/p90/p99/max latency in ms,
and client_cpu_ms_per_request (this generator's own CPU during the pass: its share of the
cores that a server on the same machine does not get).
With --out, writes one line per answer (uri, status code, label_index, confidence).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from .common import list_images

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Answer:
    uri: str
    status: int
    latency_s: float
    label_index: int | None = None
    confidence: float | None = None
    error: str = ""


@dataclass
class Pass:
    clients: int
    wall_s: float = 0.0
    cpu_s: float = 0.0
    answers: list[Answer] = field(default_factory=list)
    stopped_early: bool = False

    def summary(self) -> dict[str, Any]:
        ok = [a for a in self.answers if a.status == 200 and a.label_index is not None]
        lat = np.asarray([a.latency_s for a in self.answers], dtype=np.float64) * 1e3

        def pct(q: float) -> float | None:
            return round(float(np.percentile(lat, q)), 2) if lat.size else None

        errors = [a for a in self.answers if a not in ok]
        return {
            "clients": self.clients,
            "requests": len(self.answers),
            "ok": len(ok),
            "errors": len(errors),
            "error_samples": sorted({f"{a.status} {a.error}"[:200] for a in errors})[:5],
            "stopped_early": self.stopped_early,
            "wall_s": round(self.wall_s, 4),
            "images_per_s": round(len(ok) / self.wall_s, 2) if self.wall_s > 0 else None,
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "max_ms": round(float(lat.max()), 2) if lat.size else None,
            "client_cpu_ms_per_request": (
                round(self.cpu_s * 1e3 / len(self.answers), 3) if self.answers else None
            ),
        }


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load {host!r}: this generator targets loopback only")


async def run_grpc_pass(
    target: str,
    model: str,
    images: list[tuple[str, bytes]],
    *,
    clients: int,
    max_s: float,
    timeout_s: float = 60.0,
) -> Pass:
    """As run_pass, each image a ModelInfer call of `model` at host:port `target`."""
    import grpc

    from ics_service.server.v2_grpc import SERVICE, message
    from ics_service.server.v2_wire import serialize_bytes

    request_type = message("ModelInferRequest")
    response_type = message("ModelInferResponse")

    def request_of(body: bytes) -> bytes:
        r = request_type(model_name=model)
        r.inputs.add(name="INPUT", datatype="BYTES", shape=[1])
        r.outputs.add(name="probabilities")
        r.raw_input_contents.append(serialize_bytes([body]))
        data: bytes = r.SerializeToString()
        return data

    result = Pass(clients=clients)
    next_index = 0
    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=request_of,
            response_deserializer=response_type.FromString,
        )
        started = time.perf_counter()
        cpu_started = time.process_time()
        deadline = started + max_s

        async def one_client() -> None:
            nonlocal next_index
            while next_index < len(images):
                if time.perf_counter() > deadline:
                    result.stopped_early = True
                    return
                uri, body = images[next_index]
                next_index += 1
                t0 = time.perf_counter()
                try:
                    response = await infer(body, timeout=timeout_s)
                except grpc.aio.AioRpcError as e:
                    dt = time.perf_counter() - t0
                    result.answers.append(
                        Answer(uri, 0, dt, error=f"{e.code().name}: {e.details()}")
                    )
                    continue
                dt = time.perf_counter() - t0
                result.answers.append(_grpc_answer(uri, response, dt))

        await asyncio.gather(*(one_client() for _ in range(clients)))
        result.wall_s = time.perf_counter() - started
        result.cpu_s = time.process_time() - cpu_started
    return result


def _grpc_answer(uri: str, response: Any, latency_s: float) -> Answer:
    """An answer from a ModelInferResponse: status 200 when it holds one image's
    probabilities, as the HTTP answers' status."""
    try:
        (raw,) = response.raw_output_contents
        probs = np.frombuffer(raw, dtype="<f4")
        i = int(probs.argmax())
        return Answer(uri, 200, latency_s, i, float(probs[i]))
    except ValueError as e:
        return Answer(uri, 200, latency_s, error=f"unexpected answer ({e}): {response}"[:200])


async def run_pass(
    url: str,
    images: list[tuple[str, bytes]],
    *,
    clients: int,
    max_s: float,
    timeout_s: float = 60.0,
    content_type: str = "image/jpeg",
    headers: Mapping[str, str] | None = None,
) -> Pass:
    """Send every image once, `clients` requests at a time; stop early after `max_s`."""
    result = Pass(clients=clients)
    next_index = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Content-Type": content_type, **(headers or {})}
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        started = time.perf_counter()
        cpu_started = time.process_time()
        deadline = started + max_s

        async def one_client() -> None:
            nonlocal next_index
            while next_index < len(images):
                if time.perf_counter() > deadline:
                    result.stopped_early = True
                    return
                uri, body = images[next_index]
                next_index += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError as e:
                    dt = time.perf_counter() - t0
                    result.answers.append(Answer(uri, 0, dt, error=f"{type(e).__name__}: {e}"))
                    continue
                dt = time.perf_counter() - t0
                result.answers.append(_answer(uri, r, dt))

        await asyncio.gather(*(one_client() for _ in range(clients)))
        result.wall_s = time.perf_counter() - started
        result.cpu_s = time.process_time() - cpu_started
    return result


def _answer(uri: str, r: httpx.Response, latency_s: float) -> Answer:
    if r.status_code != 200:
        return Answer(uri, r.status_code, latency_s, error=r.text[:200])
    try:
        doc = r.json()
        return Answer(uri, 200, latency_s, int(doc["label_index"]), float(doc["confidence"]))
    except (ValueError, KeyError, TypeError) as e:
        return Answer(uri, 200, latency_s, error=f"unexpected answer ({e}): {r.text[:200]}")


def load_images(folder: str | Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in list_images(folder)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="POST every JPEG of a folder to a server.")
    p.add_argument(
        "url",
        help="server base URL, e.g. http://127.0.0.1:8080, or grpc://127.0.0.1:8081 for "
        "the Open Inference Protocol over gRPC",
    )
    p.add_argument("folder")
    p.add_argument(
        "--path",
        default="/v1/classify",
        help="route the images are posted to; it must answer a result record (label_index)",
    )
    p.add_argument("--model", help="the model a grpc:// URL's ModelInfer calls name")
    p.add_argument("--clients", type=int, default=1, help="requests in flight at once")
    p.add_argument("--max-s", type=float, default=300.0, help="stop the pass after this")
    p.add_argument("--timeout-s", type=float, default=60.0, help="limit of one request")
    p.add_argument("--out", help="write one JSON line per answer here")
    args = p.parse_args(argv)
    check_loopback(args.url)
    images = load_images(args.folder)
    if not images:
        raise SystemExit(f"no JPEG images in {args.folder}")
    if args.url.startswith("grpc://"):
        if not args.model:
            raise SystemExit("a grpc:// URL needs --model NAME: the model ModelInfer calls name")
        done = asyncio.run(
            run_grpc_pass(
                args.url.removeprefix("grpc://").rstrip("/"),
                args.model,
                images,
                clients=args.clients,
                max_s=args.max_s,
                timeout_s=args.timeout_s,
            )
        )
    else:
        done = asyncio.run(
            run_pass(
                args.url.rstrip("/") + args.path,
                images,
                clients=args.clients,
                max_s=args.max_s,
                timeout_s=args.timeout_s,
            )
        )
    if args.out:
        with open(args.out, "w") as out:
            for a in done.answers:
                out.write(
                    json.dumps(
                        {
                            "uri": a.uri,
                            "http_status": a.status,
                            "label_index": a.label_index,
                            "confidence": a.confidence,
                            "latency_ms": round(a.latency_s * 1e3, 3),
                            "error": a.error or None,
                        }
                    )
                    + "\n"
                )
    print(json.dumps(done.summary()), flush=True)


if __name__ == "__main__":
    main()
