"""`POST /v1/executions/{id}/resume` and the resume at start-up of the batches a server's
shutdown aborted, against real `ics serve` processes stopped with SIGTERM: every item is
done exactly once, the route is authenticated and refuses what cannot be resumed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import imagefiles as f
from ics_service.store import Store
from ics_service.types import ExecutionStatus
from serving import Served, serve_process

#: Most seconds a test waits for an execution to change.
DEADLINE_S = 180.0
TOKEN = "resume-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def many(tmp_path: Path, photos: Path) -> Path:
    """600 images: hard links to the photos."""
    originals = sorted(photos.iterdir())
    folder = tmp_path / "many"
    f.linked_copies([originals[i % len(originals)] for i in range(600)], folder)
    return folder


def done_count(doc: dict[str, Any]) -> int:
    c = doc["counts"]
    return int(c["SUCCEEDED"] + c["LOW_CONFIDENCE"] + c["FAILED"])


def get(served: Served, execution_id: str) -> dict[str, Any]:
    r = httpx.get(f"{served.url}/v1/executions/{execution_id}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def wait(served: Served, execution_id: str, until: str, above: int = 0) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        doc = get(served, execution_id)
        if until == "more" and doc["status"] == "RUNNING" and done_count(doc) > above:
            return doc
        # ABORTED until a worker takes it: wait for the end it comes to.
        if until == "end" and doc["status"] in ("SUCCEEDED", "FAILED"):
            return doc
        assert time.monotonic() < deadline, (doc, served.output())
        time.sleep(0.05)


def sigterm(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0, served.output()


def results_by_item(store_url: str, execution_id: str) -> dict[str, str]:
    """item id -> when its result was recorded, from the store; fails on an item twice."""
    store = Store(store_url, create=False)
    try:
        seen: dict[str, str] = {}
        for r in store.results(execution_id):
            assert r.item_id not in seen, f"item {r.item_id} has two results"
            seen[r.item_id] = r.finished_at.isoformat()
        return seen
    finally:
        store.close()


@pytest.mark.slow
def test_a_batch_aborted_by_sigterm_is_resumed_through_the_api_and_at_start_up(
    ics_home: Path, many: Path, photos: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    env = {**os.environ, "ICS_HOME": str(ics_home), "ICS_API_TOKEN": TOKEN}

    def config(resume: bool) -> Path:
        path = tmp_path / f"ics-{resume}.toml"
        path.write_text(
            f"allowed_sources = [{json.dumps(str(many))}]\n"
            "tolerated_failure_percentage = 100.0\n"
            f"resume_orphans = {str(resume).lower()}\n"
        )
        return path

    # 1. A batch is accepted (202) and stopped by SIGTERM mid-run: ABORTED.
    with serve_process("--config", str(config(False)), env=env) as served:
        r = httpx.post(
            f"{served.url}/v1/executions", json={"sources": [str(many)]}, headers=AUTH, timeout=60
        )
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        wait(served, execution_id, "more")
        sigterm(served)
    first = results_by_item(store_url, execution_id)
    assert 0 < len(first) < 600, len(first)

    # 2. A server that does not resume at start-up leaves it ABORTED; the API resumes it.
    with serve_process("--config", str(config(False)), env=env) as served:
        doc = get(served, execution_id)
        assert doc["status"] == "ABORTED" and not doc["queued"], doc
        url = f"{served.url}/v1/executions/{execution_id}/resume"
        # Authenticated like every other route.
        assert httpx.post(url, timeout=30).status_code == 401
        r = httpx.post(url, headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        assert r.headers["location"] == f"/v1/executions/{execution_id}"
        wait(served, execution_id, "more", above=len(first))
        # Asked again while this server runs it: the same execution, resumed once.
        again = httpx.post(url, headers=AUTH, timeout=30)
        assert again.status_code == 202 and again.json()["status"] == "RUNNING", again.text
        sigterm(served)
    second = results_by_item(store_url, execution_id)
    assert len(first) < len(second) < 600, (len(first), len(second))
    # What was done before is not redone.
    assert {k: second[k] for k in first} == first

    # 3. A default server resumes the batch a server's shutdown aborted, by itself.
    with serve_process("--config", str(config(True)), env=env) as served:
        done = wait(served, execution_id, "end")
        assert done["status"] == "SUCCEEDED", (done, served.output())
        assert done["counts"]["total"] == 600 == done_count(done), done
        assert f"execution {execution_id} was aborted when a server stopped" in served.output()
        # Finished: nothing left to resume (400), an unknown id (404).
        url = f"{served.url}/v1/executions/{execution_id}/resume"
        r = httpx.post(url, headers=AUTH, timeout=30)
        assert r.status_code == 400 and "every item has its result" in r.text, r.text
        r = httpx.post(f"{served.url}/v1/executions/nope/resume", headers=AUTH, timeout=30)
        assert r.status_code == 404, r.text
    final = results_by_item(store_url, execution_id)
    assert len(final) == 600
    assert {k: final[k] for k in second} == second

    store = Store(store_url, create=False)
    try:
        e = store.get_execution(execution_id)
        assert e.status is ExecutionStatus.SUCCEEDED
        resumed = [ev for ev in store.history(e.id) if ev.type == "ExecutionResumed"]
        assert len(resumed) == 2, resumed
    finally:
        store.close()


@pytest.mark.slow
def test_resume_refuses_sources_outside_allowed_sources_and_cancelled_stays_cancelled(
    ics_home: Path, many: Path, photos: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "ICS_HOME": str(ics_home), "ICS_API_TOKEN": TOKEN}
    wide = tmp_path / "wide.toml"
    wide.write_text(
        f"allowed_sources = [{json.dumps(str(many))}, {json.dumps(str(photos))}]\n"
        "tolerated_failure_percentage = 100.0\n"
    )
    narrow = tmp_path / "narrow.toml"
    narrow.write_text(f"allowed_sources = [{json.dumps(str(photos))}]\n")

    with serve_process("--config", str(wide), env=env) as served:
        ids = []
        for _ in range(2):
            r = httpx.post(
                f"{served.url}/v1/executions",
                json={"sources": [str(many)]},
                headers=AUTH,
                timeout=60,
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["execution_id"])
        wait(served, ids[0], "more")
        # The second waits in the queue: cancelled by request.
        r = httpx.post(f"{served.url}/v1/executions/{ids[1]}/cancel", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "ABORTED", r.text
        sigterm(served)

    # A server that may not read `many` resumes neither, by itself or when asked.
    with serve_process("--config", str(narrow), env=env) as served:
        assert get(served, ids[0])["status"] == "ABORTED"
        r = httpx.post(f"{served.url}/v1/executions/{ids[0]}/resume", headers=AUTH, timeout=30)
        assert r.status_code == 403, r.text
        assert f"execution {ids[0]} not resumed" in served.output()
    # One that may resumes the one a shutdown aborted, not the cancelled one.
    with serve_process("--config", str(wide), env=env) as served:
        assert wait(served, ids[0], "end")["status"] == "SUCCEEDED"
        doc = get(served, ids[1])
        assert doc["status"] == "ABORTED" and not doc["queued"], doc
        # The cancelled one is resumed when asked.
        r = httpx.post(f"{served.url}/v1/executions/{ids[1]}/resume", headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        assert wait(served, ids[1], "end")["status"] == "SUCCEEDED"


@pytest.mark.slow
def test_resume_asked_many_times_at_once_queues_one_job_that_cancel_and_shutdown_reach(
    ics_home: Path, many: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    env = {**os.environ, "ICS_HOME": str(ics_home), "ICS_API_TOKEN": TOKEN}
    config = tmp_path / "ics.toml"
    config.write_text(
        f"allowed_sources = [{json.dumps(str(many))}]\n"
        "tolerated_failure_percentage = 100.0\n"
        "resume_orphans = false\n"
        "max_running_executions = 2\n"
        'log_level = "INFO"\n'
    )
    with serve_process("--config", str(config), env=env) as served:
        r = httpx.post(
            f"{served.url}/v1/executions", json={"sources": [str(many)]}, headers=AUTH, timeout=60
        )
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        wait(served, execution_id, "more")
        sigterm(served)

    def resume_at_once(served: Served, n: int = 16) -> None:
        """n resume requests sent together: each is answered 202, one job is queued."""
        url = f"{served.url}/v1/executions/{execution_id}/resume"
        barrier = threading.Barrier(n)
        answers: list[httpx.Response] = []

        def ask() -> None:
            with httpx.Client(headers=AUTH, timeout=60) as client:
                barrier.wait()
                answers.append(client.post(url))

        threads = [threading.Thread(target=ask) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [a.status_code for a in answers] == [202] * n, [a.text for a in answers]

    with serve_process("--config", str(config), env=env) as served:
        resume_at_once(served)
        doc = wait(
            served, execution_id, "more", above=len(results_by_item(store_url, execution_id))
        )
        # One job, held by the server: a cancel reaches it.
        r = httpx.post(
            f"{served.url}/v1/executions/{execution_id}/cancel", headers=AUTH, timeout=60
        )
        assert r.status_code == 200 and r.json()["status"] == "ABORTED", r.text
        # Once more, then a shutdown: it stops the one job at once (an untracked job would
        # hold the shutdown for its 30 s wait).
        resume_at_once(served)
        wait(served, execution_id, "more", above=done_count(doc))
        started = time.monotonic()
        sigterm(served)
        assert time.monotonic() - started < 15, served.output()
        assert served.output().count(f"execution {execution_id} queued for resume") == 2
    assert get_status(store_url, execution_id) is ExecutionStatus.ABORTED
    assert len(results_by_item(store_url, execution_id)) < 600  # and none twice


def get_status(store_url: str, execution_id: str) -> ExecutionStatus:
    store = Store(store_url, create=False)
    try:
        return store.get_execution(execution_id).status
    finally:
        store.close()


@pytest.mark.slow
def test_a_resume_checks_every_item_it_lists_again_against_allowed_sources(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    """A symlink inside an allowed folder fails the batch as it is listed; listing it again
    on a resume must refuse it too, not register and read the file outside."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    for photo in sorted(photos.iterdir()):
        (allowed / photo.name).write_bytes(photo.read_bytes())
    (outside / "secret.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
    (allowed / "zz-link.jpg").symlink_to(outside / "secret.jpg")
    config = tmp_path / "ics.toml"
    config.write_text(f"allowed_sources = [{json.dumps(str(allowed))}]\n")
    env = {**os.environ, "ICS_HOME": str(ics_home), "ICS_API_TOKEN": TOKEN}
    store_url = f"sqlite:///{ics_home / 'ics.db'}"

    with serve_process("--config", str(config), env=env) as served:
        r = httpx.post(
            f"{served.url}/v1/executions",
            json={"sources": [str(allowed)]},
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        failed = wait(served, execution_id, "end")
        assert failed["status"] == "FAILED", failed
        assert "not under any allowed_sources prefix" in failed["error"]["message"], failed
        # Resumable (it stopped while listing): listed again, the link is refused again.
        url = f"{served.url}/v1/executions/{execution_id}/resume"
        r = httpx.post(url, headers=AUTH, timeout=30)
        assert r.status_code == 202, r.text
        # Taken over (RUNNING) before ExecutionResumed is recorded: then wait for its end.
        deadline = time.monotonic() + DEADLINE_S
        while not any(ev["type"] == "ExecutionResumed" for ev in _history(store_url, execution_id)):
            assert time.monotonic() < deadline, served.output()
            time.sleep(0.05)
        again = wait(served, execution_id, "end")
        assert again["status"] == "FAILED", again
        assert "not under any allowed_sources prefix" in again["error"]["message"], again
        assert "zz-link.jpg is outside allowed_sources" in served.output()
    store = Store(store_url, create=False)
    try:
        read = [r.uri for r in store.results(execution_id)]
        listed = [item.uri for item in store.pending_items(execution_id)]
    finally:
        store.close()
    assert not [u for u in read + listed if "zz-link" in u or "secret" in u], (read, listed)


def _history(store_url: str, execution_id: str) -> list[dict[str, Any]]:
    store = Store(store_url, create=False)
    try:
        return [{"type": ev.type} for ev in store.history(execution_id)]
    finally:
        store.close()
