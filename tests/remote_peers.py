"""Two small real servers for the remote-model tests, each run as its own process
(`python tests/remote_peers.py sagemaker|v2 [options]`; it prints its port, then serves):

- `sagemaker`: answers `POST /endpoints/NAME/invocations` as a SageMaker runtime does, by
  the endpoint's name: `throttle-N-...` refuses the first N calls with a
  ThrottlingException, `model-error` answers a ModelError (424), `labelled` names its
  classes in the answer, `predictions` answers `{"predictions": [[...]]}`, `slow-...` takes
  0.2 s, any other answers a JSON array. Its three class probabilities depend on the
  TargetModel header. `GET /calls` lists what each invocation carried.
- `v2`: an Open Inference Protocol model `peer` taking FP32 [-1, 3, S, S] (or NHWC) tensors,
  answering softmax(per-channel means) as FP32 [-1, 3]; `--json-only` leaves out the binary
  tensor data extension. `GET /calls` lists each inference's batch size and encoding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

HEADER = "Inference-Header-Content-Length"
LABELS = ["cat", "dog", "bird"]
PROBS = {"model-b.tar.gz": [0.05, 0.15, 0.8]}
DEFAULT_PROBS = [0.97, 0.02, 0.01]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    calls: list[dict[str, Any]]
    lock: threading.Lock

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), headers)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self) -> None:
        if self.path == "/calls":
            with self.lock:
                self._json(200, self.calls)
            return
        self.get()

    def get(self) -> None:
        self._json(404, {"error": f"no {self.path}"})


class SageMakerPeer(_Handler):
    throttled: ClassVar[dict[str, int]] = {}
    in_flight: ClassVar[list[int]] = [0]

    def do_POST(self) -> None:
        body = self._body()
        parts = self.path.split("/")
        if len(parts) != 4 or parts[1] != "endpoints" or parts[3] != "invocations":
            self._json(404, {"message": f"no {self.path}"}, {"x-amzn-ErrorType": "NotFound"})
            return
        name = parts[2]
        target = self.headers.get("X-Amzn-SageMaker-Target-Model")
        with self.lock:
            self.in_flight[0] += 1
            now = self.in_flight[0]
        try:
            self._invoke(name, target, body, now)
        finally:
            with self.lock:
                self.in_flight[0] -= 1

    def _invoke(self, name: str, target: str | None, body: bytes, in_flight: int) -> None:
        if name.startswith("slow-"):
            time.sleep(0.2)
        with self.lock:
            self.calls.append(
                {
                    "endpoint": name,
                    "target_model": target,
                    "variant": self.headers.get("X-Amzn-SageMaker-Target-Variant"),
                    "content_type": self.headers.get("Content-Type"),
                    "accept": self.headers.get("Accept"),
                    "bytes": len(body),
                    "signed": self.headers.get("Authorization", "").startswith("AWS4-HMAC"),
                    "in_flight": in_flight,
                }
            )
            if name.startswith("throttle-"):
                limit = int(name.split("-")[1])
                done = self.throttled.get(name, 0)
                if done < limit:
                    self.throttled[name] = done + 1
                    self._json(
                        400,
                        {"message": "Rate exceeded"},
                        {"x-amzn-ErrorType": "ThrottlingException"},
                    )
                    return
        probs = PROBS.get(target or "", DEFAULT_PROBS)
        if name == "model-error":
            self._json(
                424,
                {
                    "OriginalStatusCode": 500,
                    "OriginalMessage": "the model crashed",
                    "message": "Received server error (500) from primary with message "
                    '"the model crashed"',
                },
                {"x-amzn-ErrorType": "ModelError"},
            )
        elif name == "labelled":
            self._json(200, {"probabilities": probs, "labels": LABELS})
        elif name == "predictions":
            self._json(200, {"predictions": [probs]})
        else:
            self._json(200, probs, {"X-Amzn-Invoked-Production-Variant": "AllTraffic"})


class V2Peer(_Handler):
    size = 32
    layout = "NCHW"
    binary = True
    #: The batch axis: -1 (any), or a fixed size, as a model without dynamic batching has.
    batch = -1

    def _shape(self) -> list[int]:
        s, n = self.size, self.batch
        return [n, 3, s, s] if self.layout == "NCHW" else [n, s, s, 3]

    def get(self) -> None:
        if self.path == "/v2":
            extensions = ["binary_tensor_data"] if self.binary else []
            self._json(200, {"name": "peer", "version": "1", "extensions": extensions})
        elif self.path == "/v2/models/peer":
            self._json(
                200,
                {
                    "name": "peer",
                    "versions": ["1"],
                    "platform": "numpy",
                    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": self._shape()}],
                    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}],
                },
            )
        else:
            self._json(404, {"error": f"unknown path {self.path}"})

    def do_POST(self) -> None:
        body = self._body()
        if self.path != "/v2/models/peer/infer":
            self._json(404, {"error": f"unknown model path {self.path}"})
            return
        length = self.headers.get(HEADER)
        size = int(length) if length is not None else len(body)
        doc = json.loads(body[:size])
        (spec,) = doc["inputs"]
        shape = spec["shape"]
        if "binary_data_size" in spec.get("parameters", {}):
            data = np.frombuffer(body[size:], dtype="<f4").reshape(shape)
        else:
            data = np.asarray(spec["data"], dtype=np.float32).reshape(shape)
        axes = (2, 3) if self.layout == "NCHW" else (1, 2)
        means = data.mean(axis=axes, dtype=np.float64)
        z = np.exp(means - means.max(axis=1, keepdims=True))
        scores = (z / z.sum(axis=1, keepdims=True)).astype("<f4")
        with self.lock:
            self.calls.append({"batch": shape[0], "binary": length is not None})
        (out,) = doc.get("outputs") or [{"name": "scores"}]
        entry: dict[str, Any] = {"name": "scores", "datatype": "FP32", "shape": [shape[0], 3]}
        if out.get("parameters", {}).get("binary_data") and self.binary:
            blob = scores.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            header = json.dumps({"model_name": "peer", "outputs": [entry]}).encode()
            kind = {"Content-Type": "application/octet-stream", HEADER: str(len(header))}
            self._send(200, header + blob, kind)
        else:
            entry["data"] = scores.reshape(-1).tolist()
            self._json(200, {"model_name": "peer", "outputs": [entry]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["sagemaker", "v2"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--layout", default="NCHW")
    parser.add_argument("--json-only", action="store_true")
    parser.add_argument("--batch", type=int, default=-1)
    args = parser.parse_args()
    handler: type[_Handler]
    if args.kind == "sagemaker":
        handler = type("Handler", (SageMakerPeer,), {"throttled": {}, "in_flight": [0]})
    else:
        handler = type(
            "Handler",
            (V2Peer,),
            {
                "size": args.size,
                "layout": args.layout,
                "binary": not args.json_only,
                "batch": args.batch,
            },
        )
    handler.calls = []
    handler.lock = threading.Lock()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print(server.server_port, flush=True)
    server.serve_forever()


@contextmanager
def peer(kind: str, *args: str) -> Iterator[str]:
    """The peer as a real process; yields its base URL, and stops it afterwards."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__)), kind, *args], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def calls(url: str) -> list[dict[str, Any]]:
    import httpx

    doc: list[dict[str, Any]] = httpx.get(f"{url}/calls", timeout=10).json()
    return doc


if __name__ == "__main__":
    main()
