"""`ics watch s3://...` and `POST /v1/events` against a real S3-protocol server (moto in
its own process): objects classified once, across a `kill -9`, and the objects an event
names classified end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest

from awsserver import REGION, AwsServer
from cli import ICS_BIN
from ics_service import sources
from ics_service.config import Settings
from ics_service.engine.feeds import S3Feed
from ics_service.models.runtime import OnnxRuntime
from ics_service.server import create_app
from ics_service.sources import remote
from serving import client_of, finished
from test_watch import all_classified, batch_executions, wait_for, watch_items, watch_process

BUCKET = "photos"


def put(photos: Path, keys: list[str]) -> dict[str, str]:
    """Upload real photos under these keys (in turn); returns key → ETag."""
    client = boto3.client("s3", region_name=REGION)
    originals = sorted(photos.iterdir())

    def one(i_key: tuple[int, str]) -> tuple[str, str]:
        i, key = i_key
        body = originals[i % len(originals)].read_bytes()
        return key, client.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"].strip('"')

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, enumerate(keys)))


@pytest.fixture
def bucket(aws: AwsServer) -> str:
    boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.mark.slow
def test_objects_added_while_it_runs_are_classified_once(
    bucket: str, ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    put(photos, ["in/b-coffee.jpg", "in/c.jpg", "in/d.jpg", "other/x.jpg", "in2/y.jpg"])
    log = tmp_path / "watch.log"
    args = ["--name", "s3live", "--settle", "2", "--poll-interval", "0.3", "--max-wait", "0.3"]
    proc = watch_process(f"s3://{bucket}/in", *args, "--json", log=log)
    try:
        wait_for("the first objects", lambda: len(watch_items(store_url, "s3live")) == 3)
        # Later keys that sort before and between the earlier ones: no key cursor finds them.
        later = put(photos, ["in/a-early.jpg", "in/bb.jpg", "in/sub/z.jpg", "in/notes.json"])
        wait_for("every object classified", lambda: all_classified(store_url, "s3live", 6))
        time.sleep(1.0)  # a few more polls: nothing is registered twice
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    found = watch_items(store_url, "s3live")
    counts = Counter(i["uri"] for i in found)
    assert set(counts.values()) == {1}
    assert sorted(counts) == sorted(
        f"s3://{bucket}/{k}"
        for k in ["in/b-coffee.jpg", "in/c.jpg", "in/d.jpg", *later]
        if not k.endswith(".json")
    )
    assert all(i["status"] != "FAILED" for i in found), found
    # Each object was --settle old (by its LastModified) when its micro-batch started.
    started = {e.name: e.started_at for e in batch_executions(store_url, "s3live")}
    listing = boto3.client("s3", region_name=REGION).list_objects_v2(Bucket=bucket, Prefix="in/")
    modified = {f"s3://{bucket}/{o['Key']}": o["LastModified"] for o in listing["Contents"]}
    for item in found:
        age = started[item["execution"]] - modified[item["uri"]]
        assert age.total_seconds() >= 2.0, (item["uri"], age)


@pytest.mark.slow
def test_a_kill_9_misses_no_object_and_repeats_none(
    bucket: str, ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    first = put(photos, [f"in/{i:04d}.jpg" for i in range(240)])
    log = tmp_path / "watch.log"
    args = ["--name", "s3crash", "--settle", "0", "--max-items", "60", "--poll-interval", "0.3"]
    proc = watch_process(f"s3://{bucket}/in/", *args, log=log)
    try:

        def results_in_a_running_batch() -> bool:
            running = {
                e.name for e in batch_executions(store_url, "s3crash") if not e.status.finished
            }
            return any(
                i["status"] and i["execution"] in running for i in watch_items(store_url, "s3crash")
            )

        wait_for("results in a running micro-batch", results_in_a_running_batch)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    done = sum(1 for i in watch_items(store_url, "s3crash") if i["status"])
    assert 0 < done < len(first)
    later = put(photos, [f"in/{i:04d}-late.jpg" for i in range(20)])

    res = subprocess.run(
        [str(ICS_BIN), "watch", f"s3://{bucket}/in/", *args, "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode in (0, 1), res.stderr
    assert any(json.loads(line)["resumed"] for line in res.stdout.splitlines()), res.stdout
    found = watch_items(store_url, "s3crash")
    counts = Counter(i["uri"] for i in found)
    assert sorted(counts) == sorted(f"s3://{bucket}/{k}" for k in [*first, *later])
    assert set(counts.values()) == {1}, [u for u, n in counts.items() if n > 1]
    assert all(i["status"] and i["status"] != "FAILED" for i in found)


@pytest.mark.anyio
async def test_an_event_classifies_the_objects_it_names(
    bucket: str, ics_home: Path, photos: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    etags = put(photos, ["uploads/red flower.jpg"])
    coffee = (photos / "coffee.jpg").read_bytes()
    client = boto3.client("s3", region_name=REGION)
    etags["uploads/c++ coffee.jpg"] = client.put_object(
        Bucket=bucket, Key="uploads/c++ coffee.jpg", Body=coffee
    )["ETag"].strip('"')
    settings = Settings(
        home=ics_home,
        store=f"sqlite:///{tmp_path / 'ics.db'}",
        allowed_sources=[f"s3://{bucket}/uploads/"],
        record_realtime=False,
        threshold=0.0,
    )
    event = {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {"key": key, "size": 1, "eTag": etags[unquoted]},
                },
            }
            for key, unquoted in [
                ("uploads/red+flower.jpg", "uploads/red flower.jpg"),
                ("uploads/c%2B%2B+coffee.jpg", "uploads/c++ coffee.jpg"),
            ]
        ]
    }
    app = create_app(settings, runtime=runtime)
    async with client_of(app) as http:
        r = await http.post("/v1/events", json=event)
        assert r.status_code == 202, r.text
        execution_id = r.json()["execution_id"]
        doc = await finished(http, execution_id)
        assert doc["status"] == "SUCCEEDED", doc
        results: list[dict[str, Any]] = (
            await http.get(f"/v1/executions/{execution_id}/results")
        ).json()["results"]
        by_uri = {x["uri"]: x for x in results}
        assert set(by_uri) == {
            f"s3://{bucket}/uploads/red flower.jpg",
            f"s3://{bucket}/uploads/c++ coffee.jpg",
        }
        assert by_uri[f"s3://{bucket}/uploads/c++ coffee.jpg"]["label"] == "espresso"
        assert all(x["status"] == "SUCCEEDED" for x in results)

        again = await http.post("/v1/events", json=event)
        assert again.status_code == 200 and again.json()["status"] == "duplicate"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_listing_errors_are_one_line(bucket: str, ics_home: Path) -> None:
    res = subprocess.run(
        [str(ICS_BIN), "watch", "s3://no-such-bucket/in/", "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "no-such-bucket" in res.stderr and "Traceback" not in res.stderr


def test_a_listing_that_fails_part_way_loses_nothing_and_a_stop_ends_it(
    bucket: str, ics_home: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources.configure(Settings(home=ics_home))
    monkeypatch.setattr(remote, "PAGE_SIZE", 2)  # pages of two keys: a few objects, pages
    put(photos, ["in/m1.jpg", "in/m2.jpg"])
    feed = S3Feed(f"s3://{bucket}/in/", settle_s=0.0, poll_s=0.0)
    never = threading.Event()
    assert sorted(s.uri for s in feed.poll(never)) == [
        f"s3://{bucket}/in/m1.jpg",
        f"s3://{bucket}/in/m2.jpg",
    ]
    # New objects on the first page of the next listing; its second page fails (throttled,
    # a lost connection): the poll returns nothing, and must not count them as returned.
    put(photos, ["in/a1.jpg", "in/a2.jpg"])
    source = sources.source_for(f"s3://{bucket}/in/")
    assert isinstance(source, remote.FsspecSource)
    fs = source.fs
    real = fs.call_s3
    pages: list[str | None] = []

    def flaky(method: str, *args: Any, **kwargs: Any) -> Any:
        pages.append(kwargs.get("ContinuationToken"))
        if kwargs.get("ContinuationToken"):
            raise ConnectionError("Connection reset by peer")
        return real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", flaky)
    assert feed.poll(never) == []
    assert len(pages) == 2
    monkeypatch.setattr(fs, "call_s3", real)
    assert sorted(s.uri for s in feed.poll(never)) == [
        f"s3://{bucket}/in/a1.jpg",
        f"s3://{bucket}/in/a2.jpg",
    ]

    # A stop (SIGTERM) ends a poll at the next page, not after the whole prefix.
    stop = threading.Event()
    pages.clear()

    def stopping(method: str, *args: Any, **kwargs: Any) -> Any:
        pages.append(kwargs.get("ContinuationToken"))
        stop.set()
        return real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", stopping)
    assert feed.poll(stop) == []
    assert len(pages) == 1
    monkeypatch.setattr(fs, "call_s3", real)

    # A deleted object is forgotten by the feed (its memory holds only what is listed):
    # uploaded again as it was, it is found again, and the watch state, which knows it,
    # keeps it from being classified twice.
    client = boto3.client("s3", region_name=REGION)
    client.delete_object(Bucket=bucket, Key="in/m1.jpg")
    assert feed.poll(never) == []
    put(photos, ["in/m1.jpg"])
    assert [s.uri for s in feed.poll(never)] == [f"s3://{bucket}/in/m1.jpg"]
