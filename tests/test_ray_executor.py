"""The Ray executor on a real Ray cluster on this machine: a head and a second node, each a
`ray start --block` process of its own (one CPU each), and real `ics` processes driving it.

A lost node (its raylet killed mid-run) and a driver killed with SIGKILL then resumed both
end with every item's one result, and the labels are the local executor's."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli import ICS_BIN, ics
from ics_service.errors import ExitCode
from ics_service.store import Store
from ics_service.types import ExecutionStatus

pytest.importorskip("ray")

RAY_BIN = Path(sys.executable).parent / "ray"
#: Photos per execution: a few seconds of work on two replicas.
PHOTOS = 160
#: Small chunks, so that the lost node has some in flight whenever it dies.
RAY_ARGS = ("--executor", "ray", "--ray-replicas", "2", "--ray-num-cpus", "1")


#: Ray's token authentication, on as Ray has it by default, with this cluster's own token.
TOKEN = secrets.token_hex(16)


def ray_env() -> dict[str, str]:
    """The environment of every process of the cluster and its drivers (the test's own,
    with ICS_HOME and PYTHONPATH)."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Node:
    """One `ray start --block` process (and what it starts, in its own process group)."""

    def __init__(self, args: list[str], log: Path) -> None:
        ports = free_ports(7)
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [
                str(RAY_BIN),
                "start",
                "--block",
                "--num-cpus",
                "1",
                "--node-ip-address",
                "127.0.0.1",
                "--object-store-memory",
                str(80 * 1024 * 1024),
                "--disable-usage-stats",
                "--node-manager-port",
                str(ports[0]),
                "--object-manager-port",
                str(ports[1]),
                "--dashboard-agent-listen-port",
                str(ports[2]),
                "--dashboard-agent-grpc-port",
                str(ports[3]),
                "--runtime-env-agent-port",
                str(ports[4]),
                "--metrics-export-port",
                str(ports[5]),
                "--min-worker-port",
                str(ports[6]),
                "--max-worker-port",
                str(ports[6] + 40),
                *args,
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=ray_env(),
        )

    def raylet(self) -> int | None:
        """The pid of this node's raylet, once it runs."""
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        for pid in _descendants(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what it started and left behind
        self.proc.wait()
        self._out.close()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head node on loopback (its own temp folder: no other Ray on the machine is
    touched); yields its address."""
    logs = tmp_path_factory.mktemp("ray-logs")
    # Ray's socket paths must stay short: a folder of its own right under /tmp.
    temp = tempfile.mkdtemp(prefix="ics-ray-", dir="/tmp")
    port, client = free_ports(2)
    head = Node(
        [
            "--head",
            "--include-dashboard",
            "false",
            "--port",
            str(port),
            "--temp-dir",
            temp,
            "--ray-client-server-port",
            str(client),
        ],
        logs / "head.log",
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: head.raylet() is not None, "the head's raylet", timeout=60)
        yield address
    finally:
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def second_node(ray_head: str, tmp_path: Path) -> Iterator[Node]:
    node = Node(["--address", ray_head], tmp_path / "node2.log")
    try:
        wait_for(lambda: node.raylet() is not None, "the second node's raylet", timeout=60)
        _wait_for_cpus(ray_head, 2)
        yield node
    finally:
        node.stop()


def _wait_for_cpus(address: str, cpus: int) -> None:
    check = (
        "import ray, sys, time\n"
        f"ray.init(address='{address}', logging_level='ERROR')\n"
        "deadline = time.monotonic() + 60\n"
        f"while ray.cluster_resources().get('CPU', 0) < {cpus}:\n"
        "    assert time.monotonic() < deadline, ray.cluster_resources()\n"
        "    time.sleep(0.2)\n"
    )
    subprocess.run(
        [sys.executable, "-c", check], check=True, timeout=90, capture_output=True, env=ray_env()
    )


@pytest.fixture
def many(tmp_path: Path, photos: Path) -> Path:
    """PHOTOS real photos (hard links to the sample JPEGs)."""
    folder = tmp_path / "many"
    folder.mkdir()
    originals = sorted(photos.glob("*.jpg"))
    for i in range(PHOTOS):
        os.link(originals[i % len(originals)], folder / f"{i:04d}.jpg")
    return folder


def _store(home: Path) -> Store:
    return Store(f"sqlite:///{home / 'ics.db'}")


def _done(home: Path) -> int:
    if not (home / "ics.db").exists():
        return 0
    store = _store(home)
    try:
        found = store.list_executions()
        return found[0].counts.done if found else 0
    except Exception:  # created meanwhile
        return 0
    finally:
        store.close()


def _start(*args: str, chunk_size: int = 4) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(ICS_BIN), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**ray_env(), "ICS_RAY_CHUNK_SIZE": str(chunk_size)},
    )


def _running(proc: subprocess.Popen[str]) -> bool:
    assert proc.poll() is None, f"ics ended with {proc.returncode} before any result"
    return True


def _killed(proc: subprocess.Popen[str]) -> None:
    """Kill an `ics` process (and its Ray workers' log readers) and show its stderr."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    print(err[-5000:], file=sys.stderr)


def _local_answers(folder: Path, out: Path) -> dict[str, tuple[str, float]]:
    store = f"sqlite:///{out.with_suffix('.db')}"
    res = ics("classify", str(folder), "-o", str(out), "--store", store)
    assert res.exit_code in (0, 1), res.output
    return {r["uri"]: (r["label"], r["confidence"]) for r in _records(out)}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ray_executor_survives_a_lost_node_with_the_local_answers(
    ics_home: Path, many: Path, tmp_path: Path, ray_head: str, second_node: Node
) -> None:
    local = _local_answers(many, tmp_path / "local.jsonl")
    out = tmp_path / "ray.jsonl"
    proc = _start(
        "classify", str(many), "-o", str(out), *RAY_ARGS, "--ray-address", ray_head,
        "--log-level", "INFO",
    )  # fmt: skip
    try:
        wait_for(lambda: _running(proc) and _done(ics_home) > 0, "the first results", 90)
        raylet = second_node.raylet()
        assert raylet is not None
        os.kill(raylet, signal.SIGKILL)
        _, err = proc.communicate(timeout=90)
    except BaseException:
        _killed(proc)
        raise
    assert proc.returncode in (0, 1), err
    assert "Traceback" not in err, err
    assert "lost a chunk" in err, "no chunk was lost: the node died too late to test anything"
    records = _records(out)
    uris = [r["uri"] for r in records]
    assert len(uris) == len(set(uris)) == PHOTOS
    store = _store(ics_home)
    try:
        (execution,) = store.list_executions()
        assert execution.counts.done == execution.counts.total == PHOTOS
        results = list(store.results(execution.id))
        assert len({r.item_id for r in results}) == len(results) == PHOTOS
        retried = [e for e in store.history(execution.id) if e.type == "TaskRetried"]
        assert any(e.details and e.details.get("error") == "WorkerLost" for e in retried)
    finally:
        store.close()
    for r in records:
        assert r["status"] != "FAILED", r
        label, confidence = local[str(r["uri"])]
        assert r["label"] == label
        assert abs(float(r["confidence"]) - confidence) <= 1e-5


def test_driver_killed_mid_run_is_resumed_on_ray(
    ics_home: Path, many: Path, ray_head: str, second_node: Node
) -> None:
    proc = _start("classify", str(many), "--name", "on-ray", *RAY_ARGS, "--ray-address", ray_head)
    try:
        wait_for(lambda: _running(proc) and _done(ics_home) > 0, "the first results", 90)
    finally:
        _killed(proc)
    assert _done(ics_home) < PHOTOS, "the run ended before the kill: nothing to resume"
    res = subprocess.run(
        [str(ICS_BIN), "executions", "resume", "on-ray", *RAY_ARGS, "--ray-address", ray_head],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=ray_env(),
    )
    assert res.returncode in (0, 1), res.stderr
    store = _store(ics_home)
    try:
        (execution,) = store.list_executions()
        assert execution.status in (ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED)
        assert execution.counts.done == execution.counts.total == PHOTOS
        results = list(store.results(execution.id))
        assert len({r.item_id for r in results}) == len(results) == PHOTOS
    finally:
        store.close()


def test_ray_executor_without_ray_exits_2_naming_the_extra(
    ics_home: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where it is missing
    res = ics("classify", str(photos), "--executor", "ray")
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "pip install 'ics-service[ray]'" in res.output
    assert not (ics_home / "ics.db").exists()


def test_ray_address_comes_from_ray_address_under_ics_ray_address(tmp_path: Path) -> None:
    from ics_service.config import load_settings

    config = tmp_path / "ics.toml"
    config.write_text('executor = "ray"\nray_address = "10.0.0.1:6379"\n')
    ray_env = {"RAY_ADDRESS": "127.0.0.1:6379"}
    loaded = load_settings(config, environ=ray_env)
    assert loaded.settings.executor == "ray"
    assert loaded.settings.ray_address == "127.0.0.1:6379"
    assert loaded.sources["ray_address"] == "env RAY_ADDRESS"
    both = load_settings(config, environ={**ray_env, "ICS_RAY_ADDRESS": "auto"})
    assert both.settings.ray_address == "auto"
    flag = load_settings(config, {"ray_address": "ray://h:10001"}, environ=ray_env)
    assert flag.settings.ray_address == "ray://h:10001"
