"""Batch executions over HTTP: start, poll, page and stream results, cancel, the queue,
resuming orphans at start-up and stopping at shutdown; in process against the ASGI app, on
both store backends where the store matters."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from ics_service.config import Settings
from ics_service.engine.execution import execution_params
from ics_service.models.runtime import OnnxRuntime
from ics_service.server import create_app
from ics_service.store import Store
from ics_service.store.schema import executions
from ics_service.types import ExecutionStatus, ModelRef
from serving import client_of, error_of, finished, serve_process

pytestmark = pytest.mark.anyio

#: Most seconds a test waits for an execution to change.
DEADLINE_S = 120.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings_of(home: Path, store_url: str, allowed: list[Path], **kw: Any) -> Settings:
    return Settings(
        home=home,
        store=store_url,
        allowed_sources=[str(p) for p in allowed],
        record_realtime=False,
        **kw,
    )


@pytest.fixture
def many(tmp_path: Path, photos: Path) -> Path:
    """A folder of 2,000 images: hard links to the photos (a batch that takes a while, even
    on a fast machine: a cancel is seen within a heartbeat)."""
    folder = tmp_path / "many"
    folder.mkdir()
    originals = sorted(photos.iterdir())
    for i in range(2000):
        src = originals[i % len(originals)]
        os.link(src, folder / f"{i:04d}-{src.name}")
    return folder


async def some_done(client: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    """The execution once it runs and has results; fails after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        doc: dict[str, Any] = (await client.get(f"/v1/executions/{execution_id}")).json()
        counts = doc["counts"]
        if counts["SUCCEEDED"] + counts["LOW_CONFIDENCE"] + counts["FAILED"] > 0:
            return doc
        assert doc["status"] == "RUNNING", doc
        assert time.monotonic() < deadline, f"{execution_id} has no result yet: {doc}"
        await asyncio.sleep(0.05)


async def start(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/v1/executions", json=body)
    assert r.status_code == 202, r.text
    doc: dict[str, Any] = r.json()
    assert r.headers["location"] == f"/v1/executions/{doc['execution_id']}"
    return doc


def ended(doc: dict[str, Any]) -> int:
    c = doc["counts"]
    return int(c["SUCCEEDED"] + c["LOW_CONFIDENCE"] + c["FAILED"])


async def test_a_batch_runs_and_its_results_are_served(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, store_url: str
) -> None:
    app = create_app(settings_of(ics_home, store_url, [photos]), runtime=runtime)
    async with client_of(app) as client:
        doc = await start(
            client,
            sources=[str(photos)],
            name="nightly",
            threshold=0.5,
            top_k=3,
            tolerated_failure_percentage=100.0,
        )
        assert doc["status"] == "RUNNING"
        assert doc["name"] == "nightly"
        assert doc["params"]["threshold"] == 0.5
        execution_id = doc["execution_id"]

        again = await client.post(
            "/v1/executions", json={"sources": [str(photos)], "name": "nightly"}
        )
        assert again.status_code == 200, again.text
        assert again.json()["execution_id"] == execution_id

        done = await finished(client, execution_id)
        n = len(list(photos.iterdir()))
        assert done["status"] == "SUCCEEDED", done
        assert done["counts"]["total"] == n == ended(done)
        assert done["queued"] is False
        assert done["failure_types"] == {}

        pages: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if after is not None:
                params["after"] = after
            page = (
                await client.get(f"/v1/executions/{execution_id}/results", params=params)
            ).json()
            assert len(page["results"]) <= 2
            pages.extend(page["results"])
            after = page["next"]
            if after is None:
                break
        assert [r["item_id"] for r in pages] == [str(i) for i in range(n)]
        assert {r["uri"] for r in pages} == {str(p) for p in photos.iterdir()}
        assert all(r["threshold"] == 0.5 and len(r["top_k"]) == 3 for r in pages)

        r = await client.get(f"/v1/executions/{execution_id}/results?format=jsonl")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert [json.loads(line) for line in r.text.splitlines()] == pages

        low = (
            await client.get(f"/v1/executions/{execution_id[:12]}/results?status=LOW_CONFIDENCE")
        ).json()
        assert [r["item_id"] for r in low["results"]] == [
            r["item_id"] for r in pages if r["status"] == "LOW_CONFIDENCE"
        ]

        events = (await client.get(f"/v1/executions/{execution_id}/history")).json()["events"]
        types = [e["type"] for e in events]
        assert types[0] == "ExecutionStarted" and types[-1] == "ExecutionSucceeded", types

        listed = (await client.get("/v1/executions", params={"status": "SUCCEEDED"})).json()
        assert [e["execution_id"] for e in listed["executions"]] == [execution_id]
        assert listed["next"] is None

        # By its name wherever an id is taken.
        by_name = (await client.get("/v1/executions/nightly")).json()
        assert by_name["execution_id"] == execution_id and by_name["status"] == "SUCCEEDED"
        r = await client.get("/v1/executions/nightly/results?format=jsonl")
        assert [json.loads(line) for line in r.text.splitlines()] == pages
        named_events = (await client.get("/v1/executions/nightly/history")).json()["events"]
        assert named_events == events
        r = await client.post("/v1/executions/nightly/cancel")
        assert r.status_code == 200 and r.json()["status"] == "SUCCEEDED", r.text
        r = await client.post("/v1/executions/nightly/resume")
        assert r.status_code == 400 and "every item has its result" in r.text, r.text
        # A name that also starts another execution's id: the answer lists both.
        other = await start(client, sources=[str(photos)], name=execution_id[:8])
        await finished(client, other["execution_id"])
        r = await client.get(f"/v1/executions/{execution_id[:8]}")
        assert r.status_code == 400, r.text
        message = error_of(r)["message"]
        assert f"is the name of {other['execution_id']}" in message and execution_id in message
        r = await client.get("/v1/executions/weekly")
        assert r.status_code == 404 and error_of(r)["type"] == "ExecutionNotFound"


async def test_executions_are_listed_a_page_at_a_time(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    ids = []
    try:
        for i in range(7):
            execution, _ = store.create_execution(
                params={"sources": []}, model=ModelRef("m", "1"), threshold=0.5, name=f"e{i}"
            )
            store.finish_execution(execution.id, ExecutionStatus.SUCCEEDED)
            ids.append(execution.id)
        # Four started in the same microsecond: a page may end inside the tie.
        with store.engine.begin() as conn:
            conn.execute(
                update(executions)
                .where(executions.c.id.in_(ids[1:5]))
                .values(started_at=dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC))
            )
        expected = [e.id for e in store.list_executions(limit=100)]
        store.append_events(ids[0], [("TaskRetried", i, None) for i in range(5)])
        app = create_app(settings_of(ics_home, store.url, [photos]), runtime=runtime, store=store)
        async with client_of(app) as client:
            seen: list[str] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 3}
                if cursor:
                    params["cursor"] = cursor
                page = (await client.get("/v1/executions", params=params)).json()
                seen.extend(e["execution_id"] for e in page["executions"])
                cursor = page["next"]
                if cursor is None:
                    break
            assert seen == expected and sorted(seen) == sorted(ids)
            events: list[str] = []
            after = 0
            while True:
                page = (
                    await client.get(
                        f"/v1/executions/{ids[0]}/history", params={"limit": 2, "after": after}
                    )
                ).json()
                assert len(page["events"]) <= 2
                events.extend(e["item_id"] for e in page["events"])
                if page["next"] is None:
                    break
                after = page["next"]
            assert events == [str(i) for i in range(5)]
            r = await client.get("/v1/executions", params={"cursor": "nonsense"})
            assert r.status_code == 400
            assert error_of(r)["type"] == "UsageError"
    finally:
        store.close()


async def test_bad_requests_get_clear_errors(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "outside.txt").write_text(f"{outside / 'a.jpg'}\n")
    (outside / "list.txt").write_text(f"{photos / 'coffee.jpg'}\n")
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    settings = settings_of(ics_home, f"sqlite:///{tmp_path / 's.db'}", [photos, allowed])
    app = create_app(settings, runtime=runtime)
    async with client_of(app) as client:
        for source in (
            str(outside),
            str(outside / "a.jpg"),
            f"{outside}/*.jpg",
            f"{photos}/../outside/*.jpg",
            f"@{outside / 'list.txt'}",
            str(allowed / "escape" / "a.jpg"),
        ):
            r = await client.post("/v1/executions", json={"sources": [str(photos), source]})
            assert r.status_code == 403, (source, r.text)
            assert "allowed_sources" in error_of(r)["message"]
        r = await client.post("/v1/executions", json={"sources": ["nosuch://x/y.jpg"]})
        assert r.status_code == 400, r.text
        bodies: list[dict[str, Any]] = [
            {"sources": []},
            {"sources": [str(photos)], "threshold": 2},
            {"sources": [str(photos)], "top_k": True},
            {"sources": [str(photos)], "surprise": 1},
            {"name": "x"},
        ]
        r = await client.post("/v1/executions", json={"sources": ["a\u0000b"]})
        assert r.status_code == 400, r.text
        for body in bodies:
            r = await client.post("/v1/executions", json=body)
            assert r.status_code == 422, (body, r.text)
            assert error_of(r)["type"] == "InvalidRequest"
        for path in ("/v1/executions/nosuch", "/v1/executions/nosuch/results"):
            r = await client.get(path)
            assert r.status_code == 404
            assert error_of(r)["type"] == "ExecutionNotFound"
        r = await client.post("/v1/executions/nosuch/cancel")
        assert r.status_code == 404

        # A list file inside, a symlinked folder inside: what they name outside is refused
        # as it is listed, and the execution FAILS saying so.
        for source in (f"@{allowed / 'outside.txt'}", str(allowed)):
            doc = await start(client, sources=[source])
            done = await finished(client, doc["execution_id"])
            assert done["status"] == "FAILED", done
            assert "not under any allowed_sources prefix" in done["error"]["message"]
            assert str(outside) not in done["error"]["message"]

        doc = await start(client, sources=[str(allowed / "*.png")])
        done = await finished(client, doc["execution_id"])
        assert done["status"] == "FAILED"
        assert "no images found" in done["error"]["message"]


async def test_a_batch_flags_low_confidence_items_unless_asked_to_fail_them(
    ics_home: Path, photos: Path, runtime: OnnxRuntime
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    app = create_app(settings_of(ics_home, store_url, [photos]), runtime=runtime)
    async with client_of(app) as client:
        flagged = await finished(
            client, (await start(client, sources=[str(photos)]))["execution_id"]
        )
        strict = await start(client, sources=[str(photos)], low_confidence="fail")
        assert strict["params"]["low_confidence"] == "fail"
        failed = await finished(client, strict["execution_id"])
        r = await client.post(
            "/v1/executions", json={"sources": [str(photos)], "low_confidence": "strict"}
        )
        assert r.status_code == 422, r.text
    assert flagged["counts"]["LOW_CONFIDENCE"] > 0 and flagged["counts"]["FAILED"] == 0
    assert flagged["status"] == "SUCCEEDED" and flagged["params"]["low_confidence"] == "flag"
    assert failed["status"] == "FAILED"
    assert failed["error"]["type"] == "States.ExceedToleratedFailureThreshold"


async def test_cancel_stops_a_running_batch(
    ics_home: Path, many: Path, runtime: OnnxRuntime, store_url: str
) -> None:
    # One image at a time on one thread: slow enough on any machine for the cancel, which
    # the runner sees within a heartbeat, to find it running.
    slow = {"batch_size": 1, "decode_workers": 1, "inference_workers": 1, "inference_threads": 1}
    app = create_app(settings_of(ics_home, store_url, [many], **slow), runtime=runtime)
    async with client_of(app) as client:
        doc = await start(client, sources=[str(many)])
        execution_id = doc["execution_id"]
        await some_done(client, execution_id)
        r = await client.post(f"/v1/executions/{execution_id}/cancel", params={"wait": 30})
        assert r.status_code == 200, r.text
        cancelled = r.json()
        assert cancelled["status"] == "ABORTED", cancelled
        assert cancelled["error"]["type"] == "States.Aborted"
        assert "cancelled by request" in cancelled["error"]["message"]
        assert 0 < ended(cancelled) < 2000
        results = (await client.get(f"/v1/executions/{execution_id}/results?format=jsonl")).text
        assert len(results.splitlines()) == ended(cancelled)
        again = await client.post(f"/v1/executions/{execution_id}/cancel")
        assert again.status_code == 200
        assert again.json()["status"] == "ABORTED"


async def test_batches_wait_their_turn(
    ics_home: Path, photos: Path, many: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    settings = settings_of(
        ics_home,
        f"sqlite:///{tmp_path / 's.db'}",
        [photos, many],
        max_running_executions=1,
        tolerated_failure_percentage=100.0,
    )
    app = create_app(settings, runtime=runtime)
    async with client_of(app) as client:
        first = await start(client, sources=[f"{many}/0[0-2]*.jpg"])
        second = await start(client, sources=[str(photos)])
        third = await start(client, sources=[str(photos)])
        assert second["queued"] is True and third["queued"] is True
        assert second["status"] == "RUNNING" and ended(second) == 0

        r = await client.post(f"/v1/executions/{third['execution_id']}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ABORTED"
        assert "cancelled by request while queued" in r.json()["error"]["message"]

        a = await finished(client, first["execution_id"])
        b = await finished(client, second["execution_id"])
        assert a["status"] == b["status"] == "SUCCEEDED"
        assert a["counts"]["total"] == 300

        async def results(execution_id: str) -> list[dict[str, Any]]:
            r = await client.get(f"/v1/executions/{execution_id}/results?format=jsonl")
            return [json.loads(line) for line in r.text.splitlines()]

        first_end = max(r["finished_at"] for r in await results(a["execution_id"]))
        second_start = min(r["started_at"] for r in await results(b["execution_id"]))
        assert first_end <= second_start
        c = (await client.get(f"/v1/executions/{third['execution_id']}")).json()
        assert c["status"] == "ABORTED" and c["counts"]["total"] == 0


def _dead_owner() -> str:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


async def test_orphans_are_resumed_at_start_up(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, store_url: str
) -> None:
    # The one killed while listing is listed again: only from where the server may read.
    settings = settings_of(ics_home, store_url, [photos], threshold=0.2)
    model = ModelRef(runtime.card.name, runtime.card.version)
    images = sorted(str(p) for p in photos.iterdir())
    store = Store(store_url)
    try:
        # Killed half-way: listed, no result yet; killed while listing; a real-time day.
        listed, _ = store.create_execution(
            params=execution_params(
                settings.model_copy(update={"tolerated_failure_percentage": 100.0}),
                [str(photos)],
            ),
            model=model,
            threshold=0.2,
        )
        store.add_items(listed.id, images)
        store.mark_listed(listed.id)
        unlisted, _ = store.create_execution(
            params=execution_params(
                settings.model_copy(update={"tolerated_failure_percentage": 100.0}),
                [str(photos)],
            ),
            model=model,
            threshold=0.2,
        )
        store.add_items(unlisted.id, images[:2])
        realtime, _ = store.create_execution(
            params={"sources": [], "realtime": True},
            model=model,
            threshold=0.0,
            name="realtime-2026-01-01",
        )
        for e in (listed, unlisted, realtime):
            store.claim(e.id, _dead_owner())

        app = create_app(settings, runtime=runtime, store=store)
        async with client_of(app) as client:
            for e in (listed, unlisted):
                done = await finished(client, e.id)
                assert done["status"] == "SUCCEEDED", done
                assert done["counts"]["total"] == len(images) == ended(done)
                events = (await client.get(f"/v1/executions/{e.id}/history")).json()["events"]
                assert "ExecutionResumed" in [ev["type"] for ev in events]
                results = (await client.get(f"/v1/executions/{e.id}/results")).json()["results"]
                assert {r["threshold"] for r in results} == {0.2}
            assert store.get_execution(realtime.id).status is ExecutionStatus.RUNNING
    finally:
        store.close()


async def test_shutdown_leaves_nothing_running(
    ics_home: Path, photos: Path, many: Path, runtime: OnnxRuntime, store_url: str
) -> None:
    store = Store(store_url)
    try:
        app = create_app(
            settings_of(ics_home, store_url, [many, photos]), runtime=runtime, store=store
        )
        async with client_of(app) as client:
            running = await start(client, sources=[str(many)])
            waiting = await start(client, sources=[str(photos)])
            await some_done(client, running["execution_id"])
        r = store.get_execution(running["execution_id"])
        w = store.get_execution(waiting["execution_id"])
        assert r.status is ExecutionStatus.ABORTED, r
        assert r.error is not None and "stopped by a signal" in r.error.message
        assert 0 < r.counts.done < 2000
        assert w.status is ExecutionStatus.ABORTED, w
        assert w.error is not None and "the server stopped before it ran" in w.error.message
        assert store.list_executions(status=ExecutionStatus.RUNNING) == []
        # Another server told not to resume interrupted executions leaves them ABORTED
        # (by default it would resume them: test_server_resume.py).
        app = create_app(
            settings_of(ics_home, store_url, [many], resume_orphans=False),
            runtime=runtime,
            store=store,
        )
        async with client_of(app) as client:
            listed = (await client.get("/v1/executions?status=RUNNING")).json()
            assert listed["executions"] == []
    finally:
        store.close()


@pytest.mark.slow
def test_ics_serve_resumes_a_killed_servers_batch_and_aborts_on_sigterm(
    ics_home: Path, many: Path, tmp_path: Path
) -> None:
    config = tmp_path / "ics.toml"
    config.write_text(
        f"allowed_sources = [{json.dumps(str(many))}]\ntolerated_failure_percentage = 100.0\n"
    )
    env = {**os.environ, "ICS_HOME": str(ics_home)}
    store_url = f"sqlite:///{ics_home / 'ics.db'}"

    def post(url: str, sources: list[str]) -> str:
        r = httpx.post(f"{url}/v1/executions", json={"sources": sources}, timeout=60.0)
        assert r.status_code == 202, r.text
        execution_id: str = r.json()["execution_id"]
        return execution_id

    def wait(url: str, execution_id: str, until: str) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            doc: dict[str, Any] = httpx.get(f"{url}/v1/executions/{execution_id}").json()
            if (until == "some" and ended(doc) > 0) or (
                until == "end" and doc["status"] != "RUNNING"
            ):
                return doc
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)

    with serve_process("--config", str(config), env=env) as served:
        killed = post(served.url, [f"{many}/0[0-2]*.jpg"])
        wait(served.url, killed, "some")
        served.proc.kill()
        served.proc.wait()

    with serve_process("--config", str(config), env=env) as served:
        done = wait(served.url, killed, "end")
        assert done["status"] == "SUCCEEDED", (done, served.output())
        assert done["counts"]["total"] == 300 == ended(done)
        stopped = post(served.url, [str(many)])
        wait(served.url, stopped, "some")
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(60) == 0, served.output()

    store = Store(store_url)
    try:
        e = store.get_execution(stopped)
        assert e.status is ExecutionStatus.ABORTED, e
        assert e.error is not None and "stopped by a signal" in e.error.message
        assert store.list_executions(status=ExecutionStatus.RUNNING) == []
    finally:
        store.close()


async def test_resume_is_refused_while_another_live_process_runs_it(
    ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    """409 for an execution another live process holds (a sleeping child stands for it,
    heard from just now), as `ics executions resume` refuses it."""
    store_url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(store_url)
    other = subprocess.Popen(["sleep", "60"])
    try:
        e, _ = store.create_execution(
            params=execution_params(Settings(), [str(photos)]),
            model=ModelRef("efficientnet-lite0", "1"),
            threshold=0.94,
        )
        store.add_items(e.id, [str(photos / "coffee.jpg")])
        store.claim(e.id, f"{socket.gethostname()}:{other.pid}")
        app = create_app(settings_of(ics_home, store_url, [photos]), runtime=runtime, store=store)
        async with client_of(app) as client:
            r = await client.post(f"/v1/executions/{e.id}/resume")
            assert r.status_code == 409, r.text
            assert error_of(r)["type"] == "ExecutionBusy"
            assert f"is still running (in {socket.gethostname()}:{other.pid})" in r.text
            assert (await client.get(f"/v1/executions/{e.id}")).json()["queued"] is False
    finally:
        other.kill()
        other.wait()
        store.close()
