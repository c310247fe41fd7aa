"""Two `ics serve` replicas on one real PostgreSQL store: real-time requests and a batch
execution spread over both, one replica killed with SIGKILL mid-execution; the other takes
the execution over and finishes it, and nothing is lost or doubled (results, real-time
requests, alerts, capture files)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import imagefiles as f
from ics_service.capture.reader import capture_files, iter_records
from ics_service.store import Store
from ics_service.types import ExecutionStatus, ItemStatus, utcnow
from receivers import webhook_receiver
from serving import Served, serve_process, wait_ready

TOKEN = "replicas-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Items of the batch: enough that the killed replica is stopped part-way.
ITEMS = 200
BROKEN = ("0000-broken.jpg", "zzzz-broken.jpg")


def replica_env(ics_home: Path, name: str, store_url: str) -> dict[str, str]:
    """The environment of one replica: a home of its own (as on its own host) with the
    session's prepared models, the shared store and token, its replica id."""
    home = ics_home.parent / f"home-{name}"
    home.mkdir()
    (home / "models").symlink_to((ics_home / "models").resolve(), target_is_directory=True)
    return {
        **os.environ,
        "ICS_HOME": str(home),
        "ICS_STORE": store_url,
        "ICS_API_TOKEN": TOKEN,
        "ICS_REPLICA_ID": name,
    }


def classify(served: Served, data: bytes) -> dict[str, Any]:
    r = httpx.post(f"{served.url}/v1/classify", content=data, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def execution(served: Served, execution_id: str) -> dict[str, Any]:
    r = httpx.get(f"{served.url}/v1/executions/{execution_id}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def done(doc: dict[str, Any]) -> int:
    c = doc["counts"]
    return int(c["SUCCEEDED"] + c["LOW_CONFIDENCE"] + c["FAILED"])


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_replica_takes_over_the_batch_of_one_killed_and_nothing_is_lost_or_doubled(
    ics_home: Path, photos: Path, tmp_path: Path, store_url: str
) -> None:
    originals = sorted(photos.glob("*.jpg"))
    batch = tmp_path / "batch"
    f.linked_copies([originals[i % len(originals)] for i in range(ITEMS)], batch)
    for name in BROKEN:  # a FAILED item (an alert) early and late in the listing
        (batch / name).write_bytes(b"\xff\xd8\xff not a jpeg")
    capture = tmp_path / "capture"  # the destination both share (an S3 prefix elsewhere)
    config = tmp_path / "ics.toml"
    realtime = [p.read_bytes() for p in originals[:4]]
    answers: dict[str, list[dict[str, Any]]] = {"replica-a": [], "replica-b": []}

    with webhook_receiver() as receiver:
        config.write_text(
            f"allowed_sources = [{json.dumps(str(batch))}]\n"
            "tolerated_failure_percentage = 100.0\n"
            "threshold = 0.01\n"  # no LOW_CONFIDENCE alerts: only the broken items'
            "execution_lease_s = 5.0\n"
            f"notify = [{json.dumps(receiver.url)}]\n"
            f"capture = {json.dumps(str(capture))}\n"
        )
        with (
            serve_process(
                "--config",
                str(config),
                env=replica_env(ics_home, "replica-a", store_url),
                ready=False,
            ) as a,
            serve_process(
                "--config",
                str(config),
                env=replica_env(ics_home, "replica-b", store_url),
                ready=False,
            ) as b,
        ):
            wait_ready(a, 60)
            wait_ready(b, 60)
            for served, name in ((a, "replica-a"), (b, "replica-b")):
                health = httpx.get(f"{served.url}/healthz").json()
                assert health == {"status": "ok", "replica": name}
            for data in realtime:
                answers["replica-a"].append(classify(a, data))
                answers["replica-b"].append(classify(b, data))

            r = httpx.post(
                f"{a.url}/v1/executions", json={"sources": [str(batch)]}, headers=AUTH, timeout=60
            )
            assert r.status_code == 202, r.text
            execution_id = r.json()["execution_id"]
            deadline = time.monotonic() + 60
            while (doc := execution(b, execution_id))["counts"]["FAILED"] < 1 or done(doc) < 20:
                assert time.monotonic() < deadline, (doc, a.output())
                time.sleep(0.02)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            killed_at = utcnow()
            assert done(doc) < ITEMS, "the batch ended before the kill: make it longer"

            for data in realtime:  # requests go on meanwhile, to the replica left
                answers["replica-b"].append(classify(b, data))
            deadline = time.monotonic() + 60
            while (doc := execution(b, execution_id))["status"] == "RUNNING":
                assert time.monotonic() < deadline, (doc, b.output())
                time.sleep(0.2)
            assert doc["status"] == "SUCCEEDED", doc
            assert f"execution {execution_id} was left running by replica-a" in b.output()

            # Both broken items alerted, whichever replica recorded them (a delivery that the
            # killed replica held when it died waits for its lease: 25 s).
            deadline = time.monotonic() + 45
            while len(receiver.posts) < len(BROKEN):
                assert time.monotonic() < deadline, (receiver.posts, b.output())
                time.sleep(0.2)
        # Replica b stopped with SIGTERM: its capture files are published.
        time.sleep(0.5)
        posts = [p.doc for p in receiver.posts]

    # Alerts: one per broken item, none twice.
    alerted = sorted(p["uri"].rsplit("/", 1)[-1] for p in posts)
    assert alerted == sorted(BROKEN), posts
    assert len({p["alert_id"] for p in posts}) == len(posts)

    store = Store(store_url, create=False)
    try:
        # The batch: every item exactly one result, run by b from the takeover on.
        ended = store.get_execution(execution_id)
        assert ended.owner == "replica-b"
        assert ended.counts.total == ITEMS + len(BROKEN) == ended.counts.done
        assert ended.counts.failed == len(BROKEN)
        results = list(store.results(execution_id))
        assert sorted(int(r.item_id) for r in results) == list(range(ITEMS + len(BROKEN)))
        assert next(store.pending_items(execution_id), None) is None
        resumed = [e for e in store.history(execution_id) if e.type == "ExecutionResumed"]
        assert [e.details for e in resumed] == [{"owner": "replica-b"}]

        # Real-time requests: each recorded once, in the day's one execution, ids distinct.
        answered = answers["replica-a"] + answers["replica-b"]
        days = {doc["execution_id"] for doc in answered}
        assert len(days) == 1, days  # (a test run across midnight UTC would see two)
        day = days.pop()
        recorded = {r.item_id: r for r in store.results(day)}
        assert sorted(recorded) == sorted(doc["item_id"] for doc in answered)
        for doc in answered:
            assert recorded[doc["item_id"]].label == doc["label"]
        assert store.get_execution(day).status is ExecutionStatus.SUCCEEDED  # b ended it
    finally:
        store.close()

    # Capture: each replica its own files (the killed one's never published); every record
    # once; everything b classified, batch items and requests, is there.
    published = capture_files(capture)
    assert published and all("-replica-b-" in p.name for p in published), published
    hidden = [p for p in capture.rglob(".*.part")]
    assert hidden and all("-replica-a-" in p.name for p in hidden), hidden
    bad: list[str] = []
    ids = [
        rec.inference_id
        for rec in iter_records(capture, on_bad=lambda p, n, why: bad.append(f"{p}:{n}: {why}"))
    ]
    assert not bad and len(ids) == len(set(ids))
    after_kill = killed_at + dt.timedelta(seconds=1)
    by_b = {
        f"{execution_id}/{r.item_id}"
        for r in results
        if r.status is not ItemStatus.FAILED and r.finished_at > after_kill
    }
    assert by_b and by_b <= set(ids)
    assert {f"{day}/{doc['item_id']}" for doc in answers["replica-b"]} <= set(ids)
