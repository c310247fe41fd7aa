"""A minimal one-image-per-request model endpoint, the shape of the original design's
SageMaker endpoint: POST /invocations with {"image": BASE64} answers {"probabilities": [...]}
for all classes. Standard library only; one onnxruntime session shared by the request
threads, the plain preprocessing (as a generic image endpoint does).

    python -m benchmarks.http_endpoint MODEL_JSON [--port 0]

Prints `PORT N` on stdout once it listens, and serves until terminated.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ics_service.models.runtime import softmax

from .common import ModelInfo, plain_preprocess, session, session_settings


def make_handler(info: ModelInfo, sess: Any) -> type[BaseHTTPRequestHandler]:
    from PIL import Image

    input_name = sess.get_inputs()[0].name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # no access log
            pass

        def _send(self, status: int, doc: object) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/ping":
                self._send(200, {"status": "ok"})
            elif self.path == "/settings":  # what the harness prints beside the row
                self._send(200, {**session_settings(sess), "batch_size": 1})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/invocations":
                self._send(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length", "0"))
            try:
                doc = json.loads(self.rfile.read(length))
                data = base64.b64decode(doc["image"])
                with Image.open(io.BytesIO(data)) as im:
                    img = im.convert("RGB")
                x = plain_preprocess(img, info)[None]
                (logits,) = sess.run(None, {input_name: x})
                probs = softmax(logits) if info.logits else logits
            except Exception as e:
                self._send(400, {"error": f"{type(e).__name__}: {e}"})
                return
            self._send(200, {"probabilities": [round(float(v), 7) for v in probs[0]]})

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="One-image-per-request model endpoint.")
    p.add_argument("model_json")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    info = ModelInfo.load(args.model_json)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(info, session(info.path)))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
