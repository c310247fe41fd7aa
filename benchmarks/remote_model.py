"""ICS classifying through a remote model: `ics classify --model sagemaker:ENDPOINT` against
a local `ics serve` of the same model, reached by boto3's `sagemaker-runtime` client on
loopback, so that the cost of the network hop (HTTP, JSON, the server's own decode, batching
and recording) sits beside the local model's row.

The runner starts the server on a free port (its start-up counts in the whole-process time,
as every runner's does; the steady rate is `ics classify`'s own), waits until it is ready,
writes the served model's labels to LABELS (the endpoint answers bare probabilities), runs
the `ics classify` command line given after `--` with boto3 pointed at the server, prints
that command's JSON summary as its own, stops the server and removes its store and the
labels file.

    python -m benchmarks.remote_model MODEL_JSON SERVER_STORE_URL LABELS -- ics classify ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .server_bench import ROOT, free_port, server_command, stop, wait_ready

#: The endpoint name `ics classify` invokes: `ics serve` answers any name with its model.
ENDPOINT = "ics-bench"
#: Credentials and region boto3 signs with; `ics serve` without SigV4 keys checks none.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAICSBENCH00000000",
    "AWS_SECRET_ACCESS_KEY": "ics-bench-not-a-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def remote_env(url: str) -> dict[str, str]:
    """This environment with boto3 pointed at the local server and no other AWS settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENV, AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=url)
    return env


def write_labels(path: Path, model_json: str) -> None:
    """The served model's labels, one per line, for `--labels`."""
    name = json.loads(Path(model_json).read_text())["name"]
    ics = Path(sys.executable).parent / "ics"
    r = subprocess.run(
        [str(ics), "models", "info", name, "--labels"], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise SystemExit(f"`ics models info {name} --labels` failed: {r.stderr[-2000:]}")
    path.write_text(r.stdout, encoding="utf-8")


def _remove(store: str, labels: Path) -> None:
    """The server's SQLite store and the labels file: this run's alone."""
    labels.unlink(missing_ok=True)
    if store.startswith("sqlite:///"):
        db = Path(store.removeprefix("sqlite:///"))
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    if "--" not in args_in:
        raise SystemExit("usage: remote_model MODEL_JSON SERVER_STORE LABELS -- ics classify ...")
    split = args_in.index("--")
    p = argparse.ArgumentParser(description="ics classify through sagemaker: to ics serve")
    p.add_argument("model_json")
    p.add_argument("server_store")
    p.add_argument("labels", type=Path)
    p.add_argument("--ready-timeout-s", type=float, default=120.0)
    args = p.parse_args(args_in[:split])
    classify = args_in[split + 1 :]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    write_labels(args.labels, args.model_json)
    with tempfile.TemporaryDirectory(prefix="ics-remote-bench-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                server_command("ics", args.model_json, port, args.server_store),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_ready(proc, url + "/readyz", args.ready_timeout_s)
            r = subprocess.run(
                classify,
                env=remote_env(url),
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            rc = stop(proc)
            _remove(args.server_store, args.labels)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        if r.returncode != 0 or rc not in (0, -15):
            tail = log_path.read_text(errors="replace")[-2000:]
            print(f"server exit {rc}; its log:\n{tail}", file=sys.stderr)
        raise SystemExit(r.returncode)


if __name__ == "__main__":
    main()
