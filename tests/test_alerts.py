"""Alerts: subscriptions, the webhook and file channels against real receivers, the outbox
in the store (both backends), digests, rate limits, dead letters, and delivery that
survives a receiver that is down or a process killed between recording and sending."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from awsserver import AwsServer
from cli import ICS_BIN, ics
from ics_service.alerts.channels import DeliveryError, channel_for, channel_of
from ics_service.alerts.dispatcher import LEASE_FACTOR, LEASE_SLACK_S, Dispatcher
from ics_service.alerts.planner import Planner
from ics_service.config import load_settings
from ics_service.errors import ExitCode, StoreError, UsageError
from ics_service.store import Store
from ics_service.store.outbox import NewAlert, Outbox
from ics_service.subscriptions import Subscription
from ics_service.types import (
    ErrorInfo,
    ExecutionStatus,
    ItemResult,
    ItemStatus,
    ModelRef,
    Prediction,
    utcnow,
)
from receivers import SilentListener, verify, webhook_receiver
from serving import free_port, serve_process

SECRET = "k3y-never-shown"
#: Retries of the Notify step for tests: fast and many, so a receiver may come back.
FAST_RETRY = json.dumps(
    {"Notify": {"interval_seconds": 0.2, "max_attempts": 99, "backoff_rate": 1.0, "jitter": "NONE"}}
)


@pytest.fixture
def images(photos: Path, tmp_path: Path) -> Path:
    """The real photos and one broken file: LOW_CONFIDENCE, SUCCEEDED and FAILED items."""
    folder = tmp_path / "images"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    return folder


def store_alerts(store_url: str) -> list[dict[str, Any]]:
    store = Store(store_url, create=False)
    try:
        return Outbox(store).list(limit=100_000)
    finally:
        store.close()


def only_execution(store_url: str) -> Any:
    store = Store(store_url, create=False)
    try:
        (e,) = store.list_executions()
        return e
    finally:
        store.close()


def expected_alerts(e: Any) -> int:
    """Alerts of an execution: one per LOW_CONFIDENCE or FAILED item, one if it FAILED."""
    return int(e.counts.low_confidence + e.counts.failed + (e.status is ExecutionStatus.FAILED))


# --- subscriptions and settings ---------------------------------------------------------


def test_a_subscription_takes_its_options_from_the_url_and_hides_its_secret() -> None:
    s = Subscription.model_validate(
        "https://hooks.example/in?team=ops&ics-kinds=item_failed,execution_failed"
        f"&ics-mode=digest&ics-rate=10/1m&ics-secret={SECRET}"
    )
    assert s.url == "https://hooks.example/in?team=ops"
    assert s.kinds == ("item_failed", "execution_failed")
    assert (s.mode, s.rate, s.secret) == ("digest", (10, 60.0), SECRET)
    assert SECRET not in s.shown() and "ics-secret=***" in s.shown()
    assert SECRET not in repr(s)
    # The same subscription as an ics.toml table is the same subscription.
    table = Subscription.model_validate(
        {
            "url": "https://hooks.example/in?team=ops",
            "kinds": ["item_failed", "execution_failed"],
            "mode": "digest",
            "rate_limit": "10/1m",
            "secret": SECRET,
        }
    )
    assert table.id == s.id
    assert Subscription.model_validate("file:///tmp/a.jsonl?ics-rate=3/2s").rate == (3, 2.0)


def test_subscriptions_come_from_the_file_the_environment_and_flags(
    ics_home: Path, tmp_path: Path
) -> None:
    config = tmp_path / "ics.toml"
    config.write_text(
        'notify = ["file:///tmp/audit.jsonl", '
        f'{{url = "https://hooks.example/in", mode = "digest", secret = "{SECRET}"}}]\n'
    )
    loaded = load_settings(config, environ={})
    assert [(s.url, s.mode) for s in loaded.settings.notify] == [
        ("file:///tmp/audit.jsonl", "each"),
        ("https://hooks.example/in", "digest"),
    ]
    plain = load_settings(None, environ={"ICS_NOTIFY": "https://h.example/x?ics-mode=digest"})
    assert [(s.url, s.mode) for s in plain.settings.notify] == [("https://h.example/x", "digest")]
    as_json = load_settings(None, environ={"ICS_NOTIFY": json.dumps([{"url": "file:///a.jsonl"}])})
    assert [s.url for s in as_json.settings.notify] == ["file:///a.jsonl"]

    shown = ics("config", "show", "--config", str(config))
    assert shown.exit_code == 0, shown.output
    assert "https://hooks.example/in?ics-mode=digest&ics-secret=***" in shown.output
    assert SECRET not in shown.output


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"https://h.example/x?ics-kinds=everything&ics-secret={SECRET}", "unknown alert kind"),
        (f"https://h.example/x?ics-rate=lots&ics-secret={SECRET}", "must look like 10/1m"),
        (f"https://h.example/x?ics-mode=sometimes&ics-secret={SECRET}", "'each' or 'digest'"),
        (f"file:///tmp/a.jsonl?ics-secret={SECRET}", "signs webhooks only"),
        ("file:///no/such/folder/a.jsonl", "does not exist"),
        ("hooks.example/in", "needs a scheme"),
        (f"https://:{SECRET}@/in", "has no host"),
    ],
)
def test_a_subscription_that_cannot_work_is_a_usage_error_before_any_work(
    ics_home: Path, images: Path, url: str, says: str
) -> None:
    res = ics("classify", str(images), "--notify", url)
    assert res.exit_code == 2, res.output
    assert says in res.output
    assert SECRET not in res.output
    assert "Traceback" not in res.output
    assert not (ics_home / "ics.db").exists() or only_execution_count(ics_home) == 0


def only_execution_count(home: Path) -> int:
    store = Store(f"sqlite:///{home / 'ics.db'}", create=False)
    try:
        return len(store.list_executions())
    finally:
        store.close()


# --- channels against real receivers ----------------------------------------------------


def test_the_webhook_posts_the_document_signed_with_an_idempotency_key() -> None:
    settings = load_settings(None, environ={}).settings
    alert = {"version": 1, "alert_id": "5f0c6f0e-0000-4000-8000-000000000001", "kind": "x"}
    with webhook_receiver(secret=SECRET) as receiver:
        sub = Subscription.model_validate(f"{receiver.url}?team=ops&ics-secret={SECRET}")
        channel = channel_of(sub, settings)
        assert SECRET not in channel.shown() and SECRET not in sub.shown(channel.shown())
        channel.send(alert, "title", "body")
        channel.close()
        (post,) = receiver.posts
        assert post.signed is True
        assert post.doc == alert
        assert post.headers["Idempotency-Key"] == alert["alert_id"]
        # What the server received: the URL's own query, never the secret.
        assert post.path == "/hook?team=ops"
        assert SECRET not in json.dumps(post.headers)
        # A wrong key does not verify: the check can fail.
        assert not verify("another key", post.headers, post.body)
        assert not verify(SECRET, post.headers, post.body + b" ")


@pytest.mark.parametrize(
    ("status", "transient"), [(400, False), (404, False), (408, True), (429, True), (503, True)]
)
def test_webhook_answers_decide_whether_a_delivery_is_retried(status: int, transient: bool) -> None:
    settings = load_settings(None, environ={}).settings
    with webhook_receiver(status=status) as receiver:
        channel = channel_for(receiver.url, timeout_s=5, settings=settings)
        with pytest.raises(DeliveryError) as e:
            channel.send({"alert_id": "a"}, "t", "b")
    assert e.value.transient is transient
    assert str(status) in str(e.value)


def test_a_receiver_that_is_down_or_hangs_is_a_transient_failure_within_the_timeout() -> None:
    settings = load_settings(None, environ={}).settings
    down = channel_for(f"http://127.0.0.1:{free_port()}/x", timeout_s=2, settings=settings)
    with pytest.raises(DeliveryError) as refused:
        down.send({"alert_id": "a"}, "t", "b")
    assert refused.value.transient
    silent = SilentListener()
    try:
        hanging = channel_for(f"http://127.0.0.1:{silent.port}/x", timeout_s=0.5, settings=settings)
        started = time.monotonic()
        with pytest.raises(DeliveryError) as timed_out:
            hanging.send({"alert_id": "a"}, "t", "b")
        assert time.monotonic() - started < 3
        assert timed_out.value.transient and "no whole answer within 0.5 s" in str(timed_out.value)
    finally:
        silent.close()


def test_unknown_or_malformed_channel_urls_are_usage_errors(tmp_path: Path) -> None:
    settings = load_settings(None, environ={}).settings
    for url in ("file://host/a.jsonl", f"file://{tmp_path}", "no-scheme"):
        with pytest.raises(UsageError):
            channel_for(url, timeout_s=1, settings=settings)


# --- the outbox in the store (both backends) --------------------------------------------

MODEL = ModelRef(name="efficientnet-lite0", version="1")


def result(execution_id: str, seq: int, status: ItemStatus, confidence: float = 0.5) -> ItemResult:
    now = utcnow()
    failed = status is ItemStatus.FAILED
    return ItemResult(
        execution_id=execution_id,
        item_id=str(seq),
        uri=f"/photos/{seq}.jpg",
        status=status,
        threshold=0.94,
        model=MODEL,
        started_at=now,
        finished_at=now,
        label=None if failed else "tabby",
        label_index=None if failed else 281,
        confidence=None if failed else confidence,
        top_k=[] if failed else [Prediction("tabby", 281, confidence)],
        error=ErrorInfo("InvalidImage", "not an image") if failed else None,
    )


@pytest.fixture
def outbox_store(store_url: str, tmp_path: Path) -> Iterator[tuple[Store, Subscription]]:
    store = Store(store_url)
    sub = Subscription.model_validate(f"file://{tmp_path}/alerts.jsonl")
    Outbox(store).register([(sub.id, sub.shown(), sub.model_dump_json())])
    store.alert_planner = Planner([sub], "https://ics.example")
    try:
        yield store, sub
    finally:
        store.close()


def test_an_alert_is_written_in_the_transaction_of_the_result_that_raises_it(
    outbox_store: tuple[Store, Subscription],
) -> None:
    store, sub = outbox_store
    e, _ = store.create_execution(params={"sources": []}, model=MODEL, threshold=0.94)
    store.add_items(e.id, [f"/photos/{i}.jpg" for i in range(4)])
    store.record_results(
        e.id,
        [
            result(e.id, 0, ItemStatus.SUCCEEDED, 0.99),
            result(e.id, 1, ItemStatus.LOW_CONFIDENCE, 0.3),
            result(e.id, 2, ItemStatus.FAILED),
        ],
    )
    listed = Outbox(store).list()
    assert sorted((a["item_id"], a["kind"]) for a in listed) == [
        ("1", "low_confidence"),
        ("2", "item_failed"),
    ]
    for a in listed:
        assert [d["status"] for d in a["deliveries"]] == ["PENDING"]
        assert a["document"]["version"] == 1 and a["document"]["alert_id"] == a["alert_id"]
        assert a["document"]["link"].startswith(f"https://ics.example/v1/executions/{e.id}/")

    # An alert that cannot be stored fails its result's transaction: the result is not
    # recorded either, and the item stays pending (a resume redoes it, alert and all).
    taken = listed[0]["alert_id"]

    class Clashing(Planner):
        def for_results(self, execution_id: str, results: Any) -> list[NewAlert]:
            return [NewAlert(taken, "low_confidence", {"alert_id": taken}, e.id, 3, 0.1, (sub.id,))]

    store.alert_planner = Clashing([sub], None)
    with pytest.raises(StoreError):
        store.record_results(e.id, [result(e.id, 3, ItemStatus.LOW_CONFIDENCE, 0.1)])
    assert [i.seq for i in store.pending_items(e.id)] == [3]
    assert store.counts(e.id).low_confidence == 1
    assert len(Outbox(store).list()) == 2

    # The execution's end raises its own alert, in the transaction that records the end.
    store.alert_planner = Planner([sub], None)
    store.finish_execution(e.id, ExecutionStatus.FAILED, ErrorInfo("States.Failed", "too many"))
    ends = [a for a in Outbox(store).list() if a["kind"] == "execution_failed"]
    assert [a["document"]["error"] for a in ends] == [
        {"type": "States.Failed", "message": "too many"}
    ]


def test_real_time_results_raise_alerts_as_they_are_appended(
    outbox_store: tuple[Store, Subscription],
) -> None:
    store, _ = outbox_store
    e, _ = store.create_execution(params={"sources": []}, model=MODEL, threshold=0.0)
    store.append_results(
        e.id,
        [result(e.id, 0, ItemStatus.FAILED), result(e.id, 0, ItemStatus.SUCCEEDED, 0.99)],
    )
    (alert,) = Outbox(store).list()
    assert (alert["kind"], alert["item_id"]) == ("item_failed", "0")


def test_a_delivery_is_leased_to_one_dispatcher_at_a_time(
    outbox_store: tuple[Store, Subscription],
) -> None:
    store, _ = outbox_store
    e, _ = store.create_execution(params={"sources": []}, model=MODEL, threshold=0.0)
    store.append_results(e.id, [result(e.id, 0, ItemStatus.FAILED)])
    one, other = Outbox(store), Outbox(store)
    (due,) = one.due()
    lease = dt.timedelta(seconds=0.5)
    assert one.claim(due.id, "host:1", lease)
    assert not other.claim(due.id, "host:2", lease)
    assert other.due() == []
    time.sleep(0.6)  # the first sender died: its lease runs out
    assert other.claim(due.id, "host:2", lease)
    # The first sender, late, cannot settle a delivery another one holds now.
    assert not one.sent(due.id, "host:1")
    assert not one.failed(due.id, "host:1", "late", retry_at=None)
    assert not one.claim(due.id, "host:1", lease)
    assert other.sent(due.id, "host:2")
    assert not one.claim(due.id, "host:1", lease)
    assert not other.anything_due()


def test_held_alerts_of_an_execution_ended_elsewhere_are_digested_by_the_next_dispatcher(
    store_url: str, tmp_path: Path
) -> None:
    digests = tmp_path / "digests.jsonl"
    sub = Subscription.model_validate(f"file://{digests}?ics-mode=digest")
    settings = load_settings(None, environ={}).settings
    store = Store(store_url)
    try:
        Outbox(store).register([(sub.id, sub.shown(), sub.model_dump_json())])
        store.alert_planner = Planner([sub], None)
        e, _ = store.create_execution(params={"sources": []}, model=MODEL, threshold=0.94)
        store.add_items(e.id, [f"/photos/{i}.jpg" for i in range(3)])
        store.record_results(
            e.id,
            [result(e.id, i, ItemStatus.LOW_CONFIDENCE, 0.1 * (i + 1)) for i in range(3)],
        )
        assert Dispatcher(store, settings).drain() == 0  # held: nothing to send yet
        store.alert_planner = None  # a process without the subscription ends it
        store.finish_execution(e.id, ExecutionStatus.SUCCEEDED)
        assert not digests.exists()
        assert Dispatcher(store, settings).drain() == 1
    finally:
        store.close()
    (digest,) = [json.loads(line) for line in digests.read_text().splitlines()]
    assert digest["kind"] == "digest" and digest["counts"] == {"low_confidence": 3}
    assert [w["item_id"] for w in digest["worst"]] == ["0", "1", "2"]


# --- end to end: classify, with real receivers ------------------------------------------


def test_classify_sends_each_alert_once_signed_and_to_the_kinds_a_file_asked_for(
    store_url: str, ics_home: Path, images: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "failures.jsonl"
    with webhook_receiver(secret=SECRET) as receiver:
        res = ics(
            "classify",
            str(images),
            "--store",
            store_url,
            "--notify",
            f"{receiver.url}?ics-secret={SECRET}",
            "--notify",
            f"file://{audit}?ics-kinds=item_failed",
            "--log-level",
            "DEBUG",
        )
        assert res.exit_code == 1, res.output  # broken.jpg FAILED: so did the execution
        e = only_execution(store_url)
        docs = receiver.wait_for(expected_alerts(e))
        posts = list(receiver.posts)
    assert SECRET not in res.output
    assert len(posts) == expected_alerts(e)  # at least once, and here exactly once
    assert all(p.signed for p in posts)
    assert [p.headers["Idempotency-Key"] for p in posts] == [d["alert_id"] for d in docs]
    kinds = [d["kind"] for d in docs]
    assert kinds.count("low_confidence") == e.counts.low_confidence
    assert kinds.count("item_failed") == e.counts.failed == 1
    assert kinds.count("execution_failed") == 1
    assert {d["alert_id"] for d in docs} == {a["alert_id"] for a in store_alerts(store_url)}
    failed = next(d for d in docs if d["kind"] == "item_failed")
    assert failed["uri"].endswith("broken.jpg") and failed["error"]["type"] == "InvalidImage"
    low = next(d for d in docs if d["kind"] == "low_confidence")
    assert low["confidence"] < low["threshold"] == 0.94 and low["top_k"]
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [d["kind"] for d in lines] == ["item_failed"]
    assert lines[0]["alert_id"] == failed["alert_id"]


def test_low_confidence_items_are_flagged_not_failed_unless_asked(
    ics_home: Path, photos: Path
) -> None:
    """Real processes and a real receiver: by default an execution whose only findings are
    LOW_CONFIDENCE items SUCCEEDS (exit 0) and alerts them, but sends no execution_failed;
    `--low-confidence fail` is the strict rule (FAILED, exit 1, execution_failed)."""
    store_url = f"sqlite:///{ics_home / 'ics.db'}"
    runs = {}
    for rule in ("flag", "fail"):
        with webhook_receiver() as receiver:
            args = ["classify", str(photos), "--json", "--notify", receiver.url, "--name", rule]
            if rule == "fail":
                args += ["--low-confidence", "fail"]
            proc = subprocess.run(
                [str(ICS_BIN), *args], capture_output=True, text=True, timeout=120, check=False
            )
            summary = json.loads(proc.stdout)
            low = summary["counts"]["LOW_CONFIDENCE"]
            assert low > 0 and summary["counts"]["FAILED"] == 0, summary
            # Every alert is in the outbox before the process exits; it sends them first.
            docs = receiver.wait_for(low + (rule == "fail"))
            time.sleep(0.5)  # nothing more arrives
            runs[rule] = (proc, summary, [d["kind"] for d in receiver.docs()], docs)
    proc, summary, kinds, _ = runs["flag"]
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert summary["status"] == "SUCCEEDED" and summary["error"] is None
    assert kinds == ["low_confidence"] * summary["counts"]["LOW_CONFIDENCE"]
    assert "Traceback" not in proc.stderr
    proc, summary, kinds, docs = runs["fail"]
    assert proc.returncode == ExitCode.FAILED, proc.stderr
    assert summary["status"] == "FAILED"
    assert summary["error"]["type"] == "States.ExceedToleratedFailureThreshold"
    assert "LOW_CONFIDENCE" in summary["error"]["message"]
    assert sorted(kinds) == sorted(
        ["low_confidence"] * summary["counts"]["LOW_CONFIDENCE"] + ["execution_failed"]
    )
    (end,) = [d for d in docs if d["kind"] == "execution_failed"]
    assert end["execution_id"] == summary["execution_id"]
    store = Store(store_url, create=False)
    try:
        by_name = {e.name: e for e in store.list_executions()}
    finally:
        store.close()
    assert by_name["flag"].status is ExecutionStatus.SUCCEEDED
    assert by_name["flag"].params["low_confidence"] == "flag"
    assert by_name["fail"].status is ExecutionStatus.FAILED
    assert by_name["fail"].params["low_confidence"] == "fail"


def test_a_digest_subscription_gets_one_summary_per_execution(
    store_url: str, ics_home: Path, images: Path
) -> None:
    with webhook_receiver() as receiver:
        res = ics(
            "classify",
            str(images),
            "--store",
            store_url,
            "--notify",
            f"{receiver.url}?ics-mode=digest",
        )
        assert res.exit_code == 1, res.output
        e = only_execution(store_url)
        (digest,) = receiver.wait_for(1)
        # Nothing else is due: another pass sends nothing more.
        again = ics("alerts", "dispatch", "--store", store_url, "--json")
        assert json.loads(again.output) == {"sent": 0, "failed": 0}
        assert len(receiver.posts) == 1
    assert digest["kind"] == "digest" and digest["execution_id"] == e.id
    assert digest["alerts"] == expected_alerts(e)
    assert digest["counts"] == {
        "low_confidence": e.counts.low_confidence,
        "item_failed": e.counts.failed,
        "execution_failed": 1,
    }
    assert digest["execution_status"] == "FAILED"
    # Failures first, then the lowest confidence.
    worst = digest["worst"]
    assert worst[0]["kind"] in ("item_failed", "execution_failed")
    confidences = [w["confidence"] for w in worst if w["kind"] == "low_confidence"]
    assert confidences == sorted(confidences)
    listed = store_alerts(store_url)
    held = [a for a in listed if a["kind"] != "digest"]
    assert {d["status"] for a in held for d in a["deliveries"]} == {"DIGESTED"}


def test_a_rate_limit_sends_so_many_then_one_notice_of_the_rest(
    store_url: str, ics_home: Path, images: Path
) -> None:
    with webhook_receiver() as receiver:
        res = ics(
            "classify",
            str(images),
            "--store",
            store_url,
            "--notify",
            f"{receiver.url}?ics-rate=3/4s",
        )
        assert res.exit_code == 1, res.output
        e = only_execution(store_url)
        first = receiver.wait_for(3)
        time.sleep(4.2)  # the rate limit's period passes
        ics("alerts", "dispatch", "--store", store_url)
        docs = receiver.wait_for(4)
        ics("alerts", "dispatch", "--store", store_url)
        assert len(receiver.posts) == 4
    assert all(d["kind"] != "suppressed" for d in first[:3])
    notice = docs[3]
    assert notice["kind"] == "suppressed"
    assert notice["suppressed"] == expected_alerts(e) - 3
    assert "ics-rate=3/4s" in notice["subscription"]


def test_a_refused_alert_is_dead_lettered_then_sent_again_by_alerts_retry(
    store_url: str, ics_home: Path, images: Path
) -> None:
    with webhook_receiver(status=400) as receiver:
        ics("classify", str(images), "--store", store_url, "--notify", receiver.url)
        e = only_execution(store_url)
        listed = json.loads(
            ics("alerts", "list", "--failed", "--json", "--store", store_url).output
        )
        assert len(listed) == expected_alerts(e)
        for a in listed:
            (d,) = a["deliveries"]
            assert (d["status"], d["attempts"]) == ("DEAD", 1)  # a 400 is not retried
            assert "HTTP 400" in d["last_error"]
        table = ics("alerts", "list", "--store", store_url)
        assert "DEAD" in table.output
        receiver.status = 200
        one = listed[0]["alert_id"]
        again = ics("alerts", "retry", one[:8], "--store", store_url)
        assert again.exit_code == 0 and "1 dead-lettered deliveries due again" in again.output
        assert [d["alert_id"] for d in receiver.wait_for(1)] == [one]
        rest = ics("alerts", "retry", "--store", store_url)
        assert f"{expected_alerts(e) - 1} dead-lettered" in rest.output
        unknown = ics("alerts", "retry", "no-such-alert", "--store", store_url)
        assert unknown.exit_code == 2 and "ics alerts list --failed" in unknown.output
        docs = receiver.wait_for(expected_alerts(e))
    assert {d["alert_id"] for d in docs} == {a["alert_id"] for a in listed}
    assert (
        json.loads(ics("alerts", "list", "--failed", "--json", "--store", store_url).output) == []
    )


def test_resuming_an_execution_alerts_on_what_the_resume_classifies(
    store_url: str, ics_home: Path, images: Path
) -> None:
    store = Store(store_url)
    try:
        e, _ = store.create_execution(
            params={"sources": [str(images)], "threshold": 0.94}, model=MODEL, threshold=0.94
        )
        # A process that died before classifying anything: every item waits.
        store.claim(e.id, f"{os.uname().nodename}:{dead_pid()}")
        store.add_items(e.id, sorted(str(p) for p in images.iterdir()))
        store.mark_listed(e.id)
    finally:
        store.close()
    with webhook_receiver() as receiver:
        res = ics("executions", "resume", e.id, "--store", store_url, "--notify", receiver.url)
        assert res.exit_code == 1, res.output
        resumed = only_execution(store_url)
        docs = receiver.wait_for(expected_alerts(resumed))
    assert {d["execution_id"] for d in docs} == {e.id}
    assert len({d["alert_id"] for d in docs}) == expected_alerts(resumed) == len(docs)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=30)
    return proc.pid


# --- faults: a receiver down, a process killed ------------------------------------------


def many_images(images: Path, copies: int) -> Path:
    """The images many times over, for a batch that takes a few seconds."""
    for i in range(1, copies):
        for f in list(images.glob("*.jpg")):
            if "-copy" not in f.stem:
                shutil.copy(f, f.with_name(f"{f.stem}-copy{i}.jpg"))
    return images


@pytest.mark.slow
def test_alerts_raised_while_the_receiver_is_down_arrive_once_it_is_back(
    store_url: str, ics_home: Path, images: Path, tmp_path: Path
) -> None:
    many_images(images, 8)
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook?ics-secret={SECRET}"
    env = {**os.environ, "ICS_RETRY": FAST_RETRY, "ICS_NOTIFY_DRAIN_S": "60"}
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [str(ICS_BIN), "classify", str(images), "--store", store_url, "--notify", url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        # Down for the first part of the batch: until a delivery has failed.
        deadline = time.monotonic() + 60
        while not failing_deliveries(store_url):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no delivery failed within 60 s"
            time.sleep(0.05)
        with webhook_receiver(port, secret=SECRET) as receiver:
            proc.wait(120)
            e = only_execution(store_url)
            posts = list(receiver.posts)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    assert proc.returncode == 1, stderr
    assert "failed (attempt 1)" in stderr and SECRET not in stderr
    stored = {a["alert_id"] for a in store_alerts(store_url)}
    arrived = {p.doc["alert_id"] for p in posts}
    assert all(p.signed for p in posts)
    assert len(stored) == expected_alerts(e) > 50
    assert arrived == stored  # after dedup by alert_id: every one, none missing, none extra


def failing_deliveries(store_url: str) -> int:
    try:
        store = Store(store_url, create=False)
    except StoreError:
        return 0  # not created yet
    try:
        return len(Outbox(store).list(failed=True))
    finally:
        store.close()


@pytest.mark.slow
def test_alerts_of_a_process_killed_before_sending_them_are_sent_by_the_next_command(
    store_url: str, ics_home: Path, images: Path
) -> None:
    silent = SilentListener()  # accepts and never answers: the deliveries stay unsent
    port = silent.port
    env = {
        **os.environ,
        "ICS_RETRY": FAST_RETRY,
        "ICS_NOTIFY_TIMEOUT_S": "1",
        "ICS_NOTIFY_DRAIN_S": "120",
    }
    proc = subprocess.Popen(
        [
            str(ICS_BIN),
            "classify",
            str(images),
            "--store",
            store_url,
            "--notify",
            f"http://127.0.0.1:{port}/hook",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        # Classification is not held up by the hanging receiver: the execution ends while
        # its alerts wait.
        while not (silent.connections and execution_finished(store_url)):
            assert proc.poll() is None, "ics classify ended before it could be killed"
            assert time.monotonic() < deadline, "no delivery attempt within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        silent.close()
    stored = {a["alert_id"] for a in store_alerts(store_url)}
    e = only_execution(store_url)
    assert len(stored) == expected_alerts(e)
    # The dead process may hold one delivery's lease (for a 1 s channel timeout).
    time.sleep(1 * LEASE_FACTOR + LEASE_SLACK_S + 0.5)
    with webhook_receiver(port) as receiver:
        res = ics("executions", "list", "--store", store_url)  # any command on the store
        assert res.exit_code == 0, res.output
        arrived = {p.doc["alert_id"] for p in receiver.posts}
    assert arrived == stored


def execution_finished(store_url: str) -> bool:
    try:
        store = Store(store_url, create=False)
    except StoreError:
        return False
    try:
        return any(e.status.finished for e in store.list_executions())
    finally:
        store.close()


@pytest.mark.slow
def test_ics_serve_alerts_on_real_time_requests_and_digests_its_day_by_the_window(
    store_url: str, ics_home: Path, photos: Path
) -> None:
    env = {**os.environ, "ICS_HOME": str(ics_home), "ICS_NOTIFY_DIGEST_WINDOW_S": "1"}
    with webhook_receiver() as each, webhook_receiver() as digests:
        with serve_process(
            "--store",
            store_url,
            "--notify",
            f"{each.url}?ics-kinds=item_failed",
            "--notify",
            f"{digests.url}?ics-mode=digest",
            env=env,
        ) as served:
            bad = httpx.post(f"{served.url}/v1/classify", content=b"not an image", timeout=60)
            assert bad.status_code == 422, bad.text
            (alert,) = each.wait_for(1)
            assert alert["kind"] == "item_failed" and alert["error"]["type"] == "InvalidImage"
            # The day's execution runs on: its digest comes once the window has passed.
            (digest,) = digests.wait_for(1)
            assert digest["kind"] == "digest" and digest["execution_status"] == "RUNNING"
            assert digest["counts"] == {"item_failed": 1}
            assert digest["execution_id"] == alert["execution_id"]
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(60) == 0, served.output()
        # Nothing was held after the digest: the day's end sends no other one.
        assert len(digests.posts) == 1 and len(each.posts) == 1


def test_classify_publishes_its_alerts_to_an_sns_topic(
    aws: AwsServer, ics_home: Path, images: Path
) -> None:
    """End to end through SNS: a real moto server fans the topic out to an SQS queue."""
    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    topic = sns.create_topic(Name="ics-alerts")["TopicArn"]
    queue = sqs.create_queue(QueueName="ops")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    res = ics("classify", str(images), "--notify", f"sns://{topic}")
    assert res.exit_code == 1, res.output
    e = only_execution(f"sqlite:///{ics_home / 'ics.db'}")
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30.0
    while len(got) < expected_alerts(e):
        assert time.monotonic() < deadline, f"{len(got)} of {expected_alerts(e)} arrived"
        answer = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in answer.get("Messages", []):
            got.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    docs = [json.loads(m["Message"]) for m in got]
    assert sorted(d["alert_id"] for d in docs) == sorted(
        a["alert_id"] for a in store_alerts(f"sqlite:///{ics_home / 'ics.db'}")
    )
    assert {m["MessageAttributes"]["execution_id"]["Value"] for m in got} == {e.id}
    assert all(len(m["Subject"]) <= 100 and m["Subject"].isascii() for m in got)


# --- after review: secrets, processes that cannot deliver, slow channels, races ---------

TGRAM_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
SLACK_TOKENS = ("T1JJ3T3L2", "A1BRTD4JD", "TIiajkdnlazkcOXrIdevi7FQ")
PUSHOVER = ("uQiRzpo4DXghDmr9QzzfQu27cmVRsG", "azGDORePK8gMaC0QOYAMyEEuzJnyUi")
CHAT_URLS = (
    f"tgram://{TGRAM_TOKEN}/12345",
    "slack://{}/{}/{}/#general".format(*SLACK_TOKENS),
    "pover://{}@{}".format(*PUSHOVER),
)
CHAT_SECRETS = (TGRAM_TOKEN, TGRAM_TOKEN.split(":")[1], *SLACK_TOKENS, *PUSHOVER)


def assert_no_chat_secret(text: str) -> None:
    for secret in CHAT_SECRETS:
        assert secret not in text, f"{secret} shown in:\n{text}"


def test_chat_tokens_never_show_in_config_logs_or_alerts_list(
    store_url: str, ics_home: Path, images: Path
) -> None:
    shown = ics("config", "show", env={"ICS_NOTIFY": json.dumps(list(CHAT_URLS))})
    assert shown.exit_code == 0, shown.output
    assert "tgram://***/***" in shown.output and "pover://***@***" in shown.output
    assert_no_chat_secret(shown.output)
    # The chat services cannot be reached from here: every send fails and is logged.
    env = {"ICS_NOTIFY_TIMEOUT_S": "1", "ICS_NOTIFY_DRAIN_S": "2", "ICS_RETRY": FAST_RETRY}
    notify = [arg for url in CHAT_URLS for arg in ("--notify", url)]
    res = ics(
        "classify", str(images), "--store", store_url, "--log-level", "INFO", *notify, env=env
    )
    assert res.exit_code == 1, res.output
    assert "tgram://1...w/12345" in res.output  # apprise's own masking, in the logs
    assert_no_chat_secret(res.output)
    for args in (("--json",), ()):
        listed = ics("alerts", "list", "--store", store_url, *args, env=env)
        assert "slack://T...2/A...D/T...Q" in listed.output
        assert_no_chat_secret(listed.output)


def raise_alerts(store: Store, subs: list[Subscription], n: int) -> str:
    """n FAILED results of a new execution, each raising an alert for subs."""
    store.alert_planner = Planner(subs, None)
    e, _ = store.create_execution(params={"sources": []}, model=MODEL, threshold=0.94)
    store.append_results(e.id, [result(e.id, i, ItemStatus.FAILED) for i in range(n)])
    return e.id


def register(store: Store, *subs: Subscription) -> None:
    Outbox(store).register([(s.id, s.shown(), s.model_dump_json()) for s in subs])


def statuses(store: Store) -> list[tuple[str, int]]:
    return [(d["status"], d["attempts"]) for a in Outbox(store).list() for d in a["deliveries"]]


def test_a_process_that_cannot_reach_a_channel_leaves_its_alerts_to_another(
    store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    sub = Subscription.model_validate(f"file://{folder}/alerts.jsonl")
    settings = load_settings(None, environ={}).settings
    store = Store(store_url)
    try:
        register(store, sub)
        raise_alerts(store, [sub], 3)
        folder.rmdir()  # this process (another host, say) has no such folder
        here = Dispatcher(store, settings)
        with caplog.at_level("INFO", logger="ics_service.alerts.dispatcher"):
            assert here.drain(until=time.monotonic() + 5) == 0
            assert here.drain(until=time.monotonic() + 5) == 0
        # Neither dead-lettered nor an attempt used up; said once.
        assert statuses(store) == [("PENDING", 0)] * 3
        assert sum("left to other ICS" in r.getMessage() for r in caplog.records) == 1
        folder.mkdir()  # a process that has it
        assert Dispatcher(store, settings).drain(until=time.monotonic() + 5) == 3
        assert statuses(store) == [("SENT", 1)] * 3
    finally:
        store.close()
    assert len((folder / "alerts.jsonl").read_text().splitlines()) == 3


def test_a_hanging_channel_does_not_delay_another_subscription(
    store_url: str, tmp_path: Path
) -> None:
    audit = tmp_path / "alerts.jsonl"
    silent = SilentListener()
    hanging = Subscription.model_validate(f"http://127.0.0.1:{silent.port}/hook")
    file = Subscription.model_validate(f"file://{audit}")
    settings = load_settings(
        None, environ={"ICS_NOTIFY_TIMEOUT_S": "1", "ICS_RETRY": FAST_RETRY}
    ).settings
    store = Store(store_url)
    try:
        register(store, hanging, file)
        raise_alerts(store, [hanging, file], 10)
        dispatcher = Dispatcher(store, settings)
        started = time.monotonic()
        dispatcher.drain(until=started + 5)
        took = time.monotonic() - started
        dispatcher.close()
    finally:
        store.close()
        silent.close()
    assert len(audit.read_text().splitlines()) == 10
    assert took < 5 + 1.5  # the send in flight ends by the deadline


def test_processes_starting_at_once_register_the_same_subscriptions(store_url: str) -> None:
    store = Store(store_url)
    errors: list[BaseException] = []
    try:
        for round_ in range(20):
            subs = [
                Subscription.model_validate(f"https://h{round_}-{i}.example/in") for i in range(3)
            ]
            barrier = threading.Barrier(6)

            def start(
                subs: list[Subscription] = subs, barrier: threading.Barrier = barrier
            ) -> None:
                try:
                    barrier.wait(timeout=30)
                    register(store, *subs)
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=start) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            assert sorted(Outbox(store).specs([s.id for s in subs])) == sorted(
                s.model_dump_json() for s in subs
            )
    finally:
        store.close()
    assert errors == []


def test_a_rate_limit_sends_at_most_n_per_period_notices_included(
    store_url: str, tmp_path: Path
) -> None:
    audit = tmp_path / "alerts.jsonl"
    sub = Subscription.model_validate(f"file://{audit}?ics-rate=3/1s")
    settings = load_settings(None, environ={}).settings
    store = Store(store_url)
    try:
        register(store, sub)
        dispatcher = Dispatcher(store, settings)
        end = time.monotonic() + 3.5
        while time.monotonic() < end:  # a steady stream: two alerts every 0.1 s
            raise_alerts(store, [sub], 2)
            dispatcher.drain(until=time.monotonic() + 0.1)
            time.sleep(0.1)
        sent = sorted(
            dt.datetime.fromisoformat(d["sent_at"])
            for a in Outbox(store).list(limit=100_000)
            for d in a["deliveries"]
            if d["status"] == "SENT"
        )
    finally:
        store.close()
    kinds = [json.loads(line)["kind"] for line in audit.read_text().splitlines()]
    assert "suppressed" in kinds and len(kinds) == len(sent)
    for i, first in enumerate(sent):
        in_period = [t for t in sent[i:] if t - first < dt.timedelta(seconds=1)]
        assert len(in_period) <= 3, sent


def test_a_read_only_command_delivers_only_what_is_due_within_the_drain(
    store_url: str, ics_home: Path
) -> None:
    settings = load_settings(None, environ={}).settings
    store = Store(store_url)
    try:
        # Nothing due: no dispatcher thread at all.
        assert Dispatcher(store, settings).start_if_due(5)._thread is None
        silent = SilentListener()
        hanging = Subscription.model_validate(f"http://127.0.0.1:{silent.port}/hook")
        register(store, hanging)
        raise_alerts(store, [hanging], 3)
    finally:
        store.close()
    env = {**os.environ, "ICS_NOTIFY_TIMEOUT_S": "10", "ICS_NOTIFY_DRAIN_S": "2"}
    try:
        started = time.monotonic()
        listed = subprocess.run(
            [str(ICS_BIN), "executions", "list", "--json", "--store", store_url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
    finally:
        silent.close()
    assert listed.returncode == 0, listed.stderr
    assert "still being sent" not in listed.stderr
    # Start-up, the listing, and at most the drain (the 10 s send is cut at its end).
    assert took < 2 + 3, took


def test_a_resume_alerts_the_subscriptions_its_execution_started_with(
    store_url: str, ics_home: Path, images: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "configured.jsonl"
    with webhook_receiver(secret=SECRET) as receiver:
        sub = Subscription.model_validate(f"{receiver.url}?ics-secret={SECRET}")
        store = Store(store_url)
        try:
            register(store, sub)
            e, _ = store.create_execution(
                params={"sources": [str(images)], "threshold": 0.94, "subscriptions": [sub.id]},
                model=MODEL,
                threshold=0.94,
            )
            store.claim(e.id, f"{os.uname().nodename}:{dead_pid()}")
            store.add_items(e.id, sorted(str(p) for p in images.iterdir()))
            store.mark_listed(e.id)
        finally:
            store.close()
        # The configuration names another subscription now: the execution's own win.
        res = ics(
            "executions",
            "resume",
            e.id,
            "--store",
            store_url,
            env={"ICS_NOTIFY": f"file://{elsewhere}"},
        )
        assert res.exit_code == 1, res.output
        resumed = only_execution(store_url)
        docs = receiver.wait_for(expected_alerts(resumed))
        assert all(p.signed for p in receiver.posts)  # the secret came from the store
    assert {d["execution_id"] for d in docs} == {e.id}
    assert not elsewhere.exists()


def test_classify_records_its_subscriptions_for_a_resume(
    store_url: str, ics_home: Path, images: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "alerts.jsonl"
    sub = Subscription.model_validate(f"file://{audit}?ics-kinds=item_failed")
    res = ics(
        "classify",
        str(images),
        "--store",
        store_url,
        "--notify",
        f"file://{audit}?ics-kinds=item_failed",
    )
    assert res.exit_code == 1, res.output
    assert only_execution(store_url).params["subscriptions"] == [sub.id]
