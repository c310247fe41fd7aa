"""The HTTP service: the v1 API, its guards and metrics, in process against the ASGI app, and
once as a real `ics serve` process (request log, graceful SIGTERM)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cli import ics_process
from ics_service.config import Settings
from ics_service.errors import ExitCode
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo
from ics_service.server import create_app
from ics_service.server.allowed import allowed_uri
from ics_service.store import Store
from ics_service.types import ExecutionStatus, ModelRef
from imagefiles import HEIC_HEAD, png_bomb, truncated_jpeg
from records import RESULT_FIELDS
from serving import client_of, error_of, free_port, serve_process

# The async tests run on asyncio through anyio's pytest plugin.
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


ESPRESSO = 967


def coffee_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(load_photo("coffee")).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def small_jpeg(side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(load_photo("coffee")).resize((side, side)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


COFFEE = coffee_jpeg()


def settings_of(home: Path, **values: Any) -> Settings:
    return Settings(home=home, **values)


def today_execution(settings: Settings) -> str:
    return "realtime-" + dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def assert_espresso(doc: dict[str, Any]) -> None:
    assert set(doc) >= RESULT_FIELDS, RESULT_FIELDS - set(doc)
    assert doc["status"] == "SUCCEEDED"
    assert doc["label_index"] == ESPRESSO
    assert doc["label"] == "espresso"
    assert doc["confidence"] >= 0.94
    assert doc["error"] is None
    assert doc["model"]["name"] == "efficientnet-lite0"
    assert doc["image"]["format"] == "JPEG"
    assert (doc["image"]["width"], doc["image"]["height"]) == (600, 400)
    assert len(doc["image"]["sha256"]) == 64
    assert doc["top_k"][0] == {
        "label": "espresso",
        "index": ESPRESSO,
        "confidence": doc["confidence"],
    }
    assert doc["threshold"] == 0.94
    assert doc["attempts"] == 1
    assert doc["started_at"] <= doc["finished_at"]
    assert set(doc["timings_ms"]) >= {"decode", "inference"}


# --- one image, every way of sending it ------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["image/jpeg", "application/x-image", "application/octet-stream", None]
)
async def test_raw_jpeg_body_gets_a_full_result_record(
    ics_home: Path, runtime: OnnxRuntime, content_type: str | None
) -> None:
    app = create_app(settings_of(ics_home), runtime=runtime)
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with client_of(app) as client:
        r = await client.post("/v1/classify", content=COFFEE, headers=headers)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert_espresso(doc)
    assert doc["uri"] == "request"
    assert len(doc["top_k"]) == 5
    assert doc["execution_id"] and doc["item_id"] != ""


async def test_threshold_and_top_k_from_query_and_json(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    app = create_app(settings_of(ics_home), runtime=runtime)
    encoded = base64.b64encode(COFFEE).decode()
    async with client_of(app) as client:
        q = await client.post(
            "/v1/classify",
            params={"threshold": "0.999", "top_k": "2"},
            content=COFFEE,
            headers={"Content-Type": "image/jpeg"},
        )
        j = await client.post(
            "/v1/classify", json={"image_base64": encoded, "threshold": 0.999, "top_k": 3}
        )
        low = await client.post(
            "/v1/classify", json={"image_base64": encoded, "threshold": 0.5, "top_k": 1}
        )
        bad = await client.post("/v1/classify", params={"top_k": "0"}, content=COFFEE)
        bad_json = await client.post("/v1/classify", json={"image_base64": encoded, "threshold": 2})
    # LOW_CONFIDENCE is an answer, not an error.
    assert q.status_code == 200, q.text
    assert (q.json()["status"], q.json()["threshold"], len(q.json()["top_k"])) == (
        "LOW_CONFIDENCE",
        0.999,
        2,
    )
    assert j.status_code == 200, j.text
    assert (j.json()["status"], len(j.json()["top_k"])) == ("LOW_CONFIDENCE", 3)
    assert j.json()["label_index"] == ESPRESSO
    assert low.status_code == 200
    assert (low.json()["status"], len(low.json()["top_k"])) == ("SUCCEEDED", 1)
    assert bad.status_code == 422
    assert error_of(bad)["type"] == "InvalidRequest"
    assert bad_json.status_code == 400
    assert "threshold" in error_of(bad_json)["message"]


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"this is not an image at all", 422, "InvalidImage"),
        (truncated_jpeg(), 422, "InvalidImage"),
        (HEIC_HEAD, 415, "UnsupportedFormat"),
        (png_bomb(), 413, "ImageTooLarge"),
    ],
    ids=["text", "truncated-jpeg", "heic", "png-bomb"],
)
async def test_bad_image_is_a_4xx_and_the_server_stays_healthy(
    ics_home: Path, runtime: OnnxRuntime, body: bytes, status: int, kind: str
) -> None:
    app = create_app(settings_of(ics_home), runtime=runtime)
    async with client_of(app) as client:
        r = await client.post("/v1/classify", content=body, headers={"Content-Type": "image/png"})
        assert r.status_code == status, r.text
        assert error_of(r)["type"] == kind
        assert error_of(r)["message"]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        good = await client.post("/v1/classify", content=COFFEE)
        assert good.status_code == 200
        assert good.json()["label_index"] == ESPRESSO
    # The failure is recorded too, as a FAILED item of the day's execution.
    with closing(Store(app.state.settings.store_url)) as store:
        execution = store.find_by_name(today_execution(app.state.settings))
        assert execution is not None
        results = list(store.results(execution.id))
    assert [r.status.value for r in results] == ["FAILED", "SUCCEEDED"]
    assert results[0].error is not None and results[0].error.type == kind


async def test_multipart_files_get_one_record_each(ics_home: Path, runtime: OnnxRuntime) -> None:
    app = create_app(settings_of(ics_home), runtime=runtime)
    files = [
        ("file", ("coffee.jpg", COFFEE, "image/jpeg")),
        ("file", ("broken.jpg", truncated_jpeg(), "image/jpeg")),
    ]
    async with client_of(app) as client:
        r = await client.post("/v1/classify", files=files)
        none = await client.post("/v1/classify", files=[("other", ("x.jpg", COFFEE))])
    assert r.status_code == 200, r.text
    docs = r.json()
    assert isinstance(docs, list) and len(docs) == 2
    ok, broken = docs
    assert set(ok) >= RESULT_FIELDS and set(broken) >= RESULT_FIELDS
    assert (ok["uri"], ok["status"], ok["label_index"]) == ("coffee.jpg", "SUCCEEDED", ESPRESSO)
    assert (broken["uri"], broken["status"]) == ("broken.jpg", "FAILED")
    assert broken["error"]["type"] == "InvalidImage"
    assert broken["label"] is None and broken["image"] is None
    assert ok["item_id"] != broken["item_id"]
    assert none.status_code == 400
    assert "file" in error_of(none)["message"]


async def test_json_uri_only_inside_allowed_sources(
    ics_home: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "coffee.jpg").write_bytes(COFFEE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(COFFEE)
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "escape-dir").symlink_to(outside, target_is_directory=True)
    sibling = tmp_path / "allowed-not"  # shares the root's name as a prefix
    sibling.mkdir()
    (sibling / "coffee.jpg").write_bytes(COFFEE)

    app = create_app(settings_of(ics_home, allowed_sources=[str(root)]), runtime=runtime)
    async with client_of(app) as client:
        for uri in (str(root / "coffee.jpg"), (root / "coffee.jpg").as_uri()):
            r = await client.post("/v1/classify", json={"uri": uri})
            assert r.status_code == 200, (uri, r.text)
            assert (r.json()["uri"], r.json()["label_index"]) == (uri, ESPRESSO)
        for uri in (
            str(outside / "secret.jpg"),
            f"{root}/../outside/secret.jpg",
            f"{root.as_uri()}/../outside/secret.jpg",
            str(root / "escape.jpg"),
            str(root / "escape-dir" / "secret.jpg"),
            str(sibling / "coffee.jpg"),
            "file:///etc/passwd",
            "/etc/passwd",
            "http://169.254.169.254/latest/meta-data/",
        ):
            r = await client.post("/v1/classify", json={"uri": uri})
            assert r.status_code == 403, (uri, r.text)
            assert error_of(r)["type"] == "Forbidden"
        missing = await client.post("/v1/classify", json={"uri": str(root / "nope.jpg")})
        assert missing.status_code == 404, missing.text
        assert error_of(missing)["type"] == "SourceNotFound"


async def test_json_uri_refused_when_no_source_is_allowed(
    ics_home: Path, runtime: OnnxRuntime, photos: Path
) -> None:
    app = create_app(settings_of(ics_home), runtime=runtime)
    async with client_of(app) as client:
        r = await client.post("/v1/classify", json={"uri": str(photos / "coffee.jpg")})
    assert r.status_code == 403
    assert "allowed_sources" in error_of(r)["message"]


def test_allowed_url_prefix_ends_at_a_path_boundary() -> None:
    # A URL prefix is compared as text: a host or folder that merely starts like the
    # allowed one must not pass, nor a `..` that climbs out of it.
    allowed = ["https://images.example.com/public"]
    allowed_uri("https://images.example.com/public/a.jpg", allowed)
    for uri in (
        "https://images.example.com/public-private/a.jpg",
        "https://images.example.com/public/../admin/a.jpg",
        "https://images.example.com/publicity.jpg",
    ):
        with pytest.raises(Exception, match="allowed_sources"):
            allowed_uri(uri, allowed)
    with pytest.raises(Exception, match="allowed_sources"):
        allowed_uri("https://images.example.com.evil.net/x.jpg", ["https://images.example.com"])


async def test_bad_requests_are_400(ics_home: Path, runtime: OnnxRuntime) -> None:
    app = create_app(settings_of(ics_home), runtime=runtime)
    async with client_of(app) as client:
        bad: list[dict[str, Any]] = [
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            {"json": [1, 2]},
            {"json": {}},
            {"json": {"image_base64": "***"}},
            {"json": {"image_base64": 12}},
            {"json": {"uri": ""}},
            {"content": b"x=1", "headers": {"Content-Type": "text/plain"}},
        ]
        for kwargs in bad:
            r = await client.post("/v1/classify", **kwargs)
            assert r.status_code == 400, (kwargs, r.text)
            assert error_of(r)["type"] == "UsageError"
        assert (await client.get("/v1/classify")).status_code == 405
        assert (await client.get("/nowhere")).status_code == 404


# --- the store ----------------------------------------------------------------------------


async def test_every_request_is_recorded_in_the_days_execution(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    settings = settings_of(ics_home)
    app = create_app(settings, runtime=runtime)
    n = 6
    async with client_of(app) as client:
        sent = [
            client.post("/v1/classify", content=COFFEE, params={"top_k": str(1 + i % 3)})
            for i in range(n - 2)
        ]
        sent.append(client.post("/v1/classify", content=small_jpeg()))
        sent.append(client.post("/v1/classify", content=b"garbage"))
        responses = await asyncio.gather(*sent)
        # The execution stays open while the server runs.
        with closing(Store(settings.store_url)) as store:
            running = store.find_by_name(today_execution(settings))
            assert running is not None and running.status == ExecutionStatus.RUNNING
    assert [r.status_code for r in responses] == [200] * (n - 1) + [422]
    docs = [r.json() for r in responses[:-1]]

    with closing(Store(settings.store_url)) as store:
        execution = store.find_by_name(today_execution(settings))
        assert execution is not None
        assert execution.status == ExecutionStatus.SUCCEEDED  # the server stopped
        stored = {r.item_id: r.to_dict() for r in store.results(execution.id)}
        counts = store.counts(execution.id)
    assert len(stored) == n
    assert counts.total == n and counts.failed == 1
    assert {d["execution_id"] for d in docs} == {execution.id}
    assert len({d["item_id"] for d in docs}) == len(docs)
    for doc in docs:
        assert stored[doc["item_id"]] == doc
    assert [r["status"] for r in stored.values()].count("FAILED") == 1


async def test_a_second_server_appends_to_the_same_day(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    settings = settings_of(ics_home)
    ids = []
    for _ in range(2):
        async with client_of(create_app(settings, runtime=runtime)) as client:
            r = await client.post("/v1/classify", content=COFFEE)
            assert r.status_code == 200
            ids.append((r.json()["execution_id"], r.json()["item_id"]))
    assert ids[0][0] == ids[1][0]
    assert ids[0][1] != ids[1][1]
    with closing(Store(settings.store_url)) as store:
        execution = store.find_by_name(today_execution(settings))
        assert execution is not None
        assert len(list(store.results(execution.id))) == 2


async def test_a_past_day_left_running_by_a_dead_server_is_ended(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    settings = settings_of(ics_home)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with closing(Store(settings.store_url)) as store:
        old, _ = store.create_execution(
            params={"sources": [], "realtime": True},
            model=ModelRef("efficientnet-lite0", "1"),
            threshold=0.0,
            name="realtime-2020-01-01",
        )
        store.claim(old.id, f"{socket.gethostname()}:{dead.pid}")
    async with client_of(create_app(settings, runtime=runtime)) as client:
        assert (await client.get("/readyz")).status_code == 200
    with closing(Store(settings.store_url)) as store:
        assert store.get_execution(old.id).status is ExecutionStatus.SUCCEEDED


async def test_record_realtime_off_records_nothing(ics_home: Path, runtime: OnnxRuntime) -> None:
    settings = settings_of(ics_home, record_realtime=False)
    app = create_app(settings, runtime=runtime)
    async with client_of(app) as client:
        r = await client.post("/v1/classify", content=COFFEE)
        assert r.status_code == 200
        assert r.json()["label_index"] == ESPRESSO
    with closing(Store(settings.store_url)) as store:
        assert store.find_by_name(today_execution(settings)) is None
        assert list(store.list_executions()) == []


# --- guards -----------------------------------------------------------------------------


async def test_token_guards_the_api_but_not_the_probes(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    app = create_app(settings_of(ics_home, api_token="s3cret-token"), runtime=runtime)
    async with client_of(app) as client:
        none = await client.post("/v1/classify", content=COFFEE)
        wrong = await client.post(
            "/v1/classify", content=COFFEE, headers={"Authorization": "Bearer nope"}
        )
        basic = await client.post(
            "/v1/classify", content=COFFEE, headers={"Authorization": "Basic czNjcmV0"}
        )
        right = await client.post(
            "/v1/classify", content=COFFEE, headers={"Authorization": "Bearer s3cret-token"}
        )
        metrics = await client.get("/metrics")
        probes = {p: (await client.get(p)).status_code for p in ("/healthz", "/readyz", "/ping")}
    assert none.status_code == 401
    assert none.headers["WWW-Authenticate"] == "Bearer"
    assert error_of(none)["type"] == "Unauthorized"
    assert wrong.status_code == 403
    assert error_of(wrong)["type"] == "Forbidden"
    assert basic.status_code == 401
    assert right.status_code == 200
    assert right.json()["label_index"] == ESPRESSO
    assert metrics.status_code == 401
    assert probes == {"/healthz": 200, "/readyz": 200, "/ping": 200}


async def test_body_over_the_limit_is_413(ics_home: Path, runtime: OnnxRuntime) -> None:
    limit = len(COFFEE) - 1
    settings = settings_of(ics_home, max_body_bytes=limit)
    app = create_app(settings, runtime=runtime)

    async def streamed() -> AsyncIterator[bytes]:
        for i in range(0, len(COFFEE), 4096):
            yield COFFEE[i : i + 4096]

    async with client_of(app) as client:
        by_length = await client.post("/v1/classify", content=COFFEE)
        by_stream = await client.post("/v1/classify", content=streamed())
        as_json = await client.post(
            "/v1/classify", json={"image_base64": base64.b64encode(COFFEE).decode()}
        )
        ok = await client.post("/v1/classify", content=small_jpeg())
    for r in (by_length, by_stream, as_json):
        assert r.status_code == 413, r.text
        assert error_of(r)["type"] == "RequestTooLarge"
        assert f"{limit:,}" in error_of(r)["message"]
    assert "content-length" not in by_stream.request.headers
    # The rest of a chunked body is left unread: the connection closes rather than drain it.
    assert by_stream.headers["connection"] == "close"
    assert ok.status_code == 200
    with closing(Store(settings.store_url)) as store:
        execution = store.find_by_name(today_execution(settings))
        assert execution is not None
        assert store.counts(execution.id).total == 1  # refused bodies are not items


async def test_queue_full_is_503_with_retry_after(ics_home: Path, runtime: OnnxRuntime) -> None:
    # One worker running one input at a time and room for one waiting: a burst overflows.
    settings = settings_of(
        ics_home,
        max_queue=1,
        max_batch_size=1,
        max_delay_ms=1000,
        inference_workers=1,
        inference_threads=1,
    )
    app = create_app(settings, runtime=runtime)
    body = small_jpeg(32)
    async with client_of(app) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/classify", content=body) for _ in range(32))
        )
        after = await client.post("/v1/classify", content=COFFEE)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1"
            assert error_of(r)["type"] == "QueueFull"
    assert after.status_code == 200


# --- metrics and the OpenAPI description ---------------------------------------------------


async def test_metrics_count_requests_batches_items_and_confidence(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    app = create_app(settings_of(ics_home), runtime=runtime)
    async with client_of(app) as client:
        for _ in range(3):
            assert (await client.post("/v1/classify", content=COFFEE)).status_code == 200
        r = await client.post("/v1/classify", content=COFFEE, params={"threshold": "0.999"})
        assert r.status_code == 200
        assert (await client.post("/v1/classify", content=b"junk")).status_code == 422
        assert (await client.get("/healthz")).status_code == 200
        m = await client.get("/metrics")
    assert m.status_code == 200
    assert m.headers["content-type"].startswith("text/plain")
    samples = metric_samples(m.text)

    def value(name: str, **labels: str) -> float:
        found = [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]
        assert found, (name, labels)
        return sum(found)

    assert value("ics_http_requests_total", route="/v1/classify", method="POST", status="2xx") == 4
    assert value("ics_http_requests_total", route="/v1/classify", status="4xx") == 1
    assert value("ics_http_requests_total", route="/healthz", method="GET", status="2xx") == 1
    assert value("ics_http_request_duration_seconds_count", route="/v1/classify") == 5
    assert value("ics_batch_size_count") == 4
    assert value("ics_batch_size_sum") == 4
    assert value("ics_inference_duration_seconds_count") == 4
    assert value("ics_items_total", status="SUCCEEDED") == 3
    assert value("ics_items_total", status="LOW_CONFIDENCE") == 1
    assert value("ics_items_total", status="FAILED") == 1
    assert value("ics_confidence_count") == 4
    assert value("ics_confidence_bucket", le="0.94") == 0  # espresso at 0.957
    assert value("ics_queue_depth") == 0


async def test_dynamic_batching_batches_concurrent_requests(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    app = create_app(
        settings_of(ics_home, max_batch_size=8, max_delay_ms=50, inference_workers=1),
        runtime=runtime,
    )
    async with client_of(app) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/classify", content=COFFEE) for _ in range(8))
        )
        m = await client.get("/metrics")
    assert [r.status_code for r in responses] == [200] * 8
    assert {r.json()["label_index"] for r in responses} == {ESPRESSO}
    samples = metric_samples(m.text)
    (count,) = [v for n, _, v in samples if n == "ics_batch_size_count"]
    (total,) = [v for n, _, v in samples if n == "ics_batch_size_sum"]
    (ones,) = [v for n, ls, v in samples if n == "ics_batch_size_bucket" and ls["le"] == "1.0"]
    assert total == 8
    assert count < 8, "every request ran in a batch of its own"
    assert ones < count, "no batch held more than one input"


async def test_openapi_lists_every_route_and_the_classify_content_types(
    ics_home: Path, runtime: OnnxRuntime
) -> None:
    from fastapi.routing import APIRoute

    app = create_app(settings_of(ics_home), runtime=runtime)
    async with client_of(app) as client:
        r = await client.get("/openapi.json")
        docs = await client.get("/docs")
    assert r.status_code == 200
    spec = r.json()
    paths = spec["paths"]
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            for method in route.methods or ():
                assert method.lower() in paths.get(route.path, {}), (method, route.path)
    for path in ("/v1/classify", "/healthz", "/readyz", "/metrics", "/ping", "/invocations"):
        assert path in paths, path
    body = paths["/v1/classify"]["post"]["requestBody"]["content"]
    # Every content type the route accepts is documented.
    assert set(body) >= {
        "image/*",
        "application/x-image",
        "application/octet-stream",
        "multipart/form-data",
        "application/json",
    }, sorted(body)
    assert set(body["application/json"]["schema"]["properties"]) >= {
        "image_base64",
        "uri",
        "threshold",
        "top_k",
    }
    assert docs.status_code == 200


# --- a real `ics serve` process --------------------------------------------------------------


def _post(url: str, body: bytes, out: list[httpx.Response | BaseException]) -> None:
    try:
        out.append(
            httpx.post(
                f"{url}/v1/classify",
                content=body,
                headers={"Content-Type": "image/jpeg"},
                timeout=60.0,
            )
        )
    except BaseException as e:  # recorded: the test reports it
        out.append(e)


@pytest.mark.slow
def test_ics_serve_process_logs_requests_and_drains_on_sigterm(ics_home: Path) -> None:
    env = {**os.environ, "ICS_HOME": str(ics_home)}
    with serve_process(
        "--log-format",
        "json",
        "--log-level",
        "INFO",
        "--max-delay-ms",
        "3000",
        "--max-batch-size",
        "16",
        env=env,
    ) as served:
        # curl -s -X POST --data-binary @coffee.jpg -H 'Content-Type: image/jpeg' URL/v1/classify
        r = httpx.post(
            f"{served.url}/v1/classify",
            content=COFFEE,
            headers={"Content-Type": "image/jpeg"},
            timeout=60.0,
        )
        assert r.status_code == 200, r.text
        assert_espresso(r.json())
        assert httpx.get(f"{served.url}/healthz").status_code == 200

        # Requests wait up to 3 s for a batch: SIGTERM arrives while they are in flight.
        results: list[httpx.Response | BaseException] = []
        threads = [
            threading.Thread(target=_post, args=(served.url, COFFEE, results)) for _ in range(4)
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)
        served.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        rc = served.proc.wait(60)
        output = served.output()

    assert rc == 0, output
    assert all(isinstance(r, httpx.Response) for r in results), results
    assert [r.status_code for r in results if isinstance(r, httpx.Response)] == [200] * 4, output
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    requests = [line["message"] for line in lines if line["message"].startswith(("GET ", "POST "))]
    assert sum(m.startswith("POST /v1/classify 200 ") for m in requests) == 5, requests
    assert any(m.startswith("GET /healthz 200 ") for m in requests), requests

    settings = settings_of(ics_home)
    with closing(Store(settings.store_url)) as store:
        execution = store.find_by_name(today_execution(settings))
        assert execution is not None
        assert execution.status != ExecutionStatus.RUNNING
        assert store.counts(execution.id).total == 5


def test_a_request_that_gives_up_does_not_stop_the_recording(ics_home: Path) -> None:
    # A request cancelled by its timeout cancels its future: the log thread must live on.
    from ics_service.engine.realtime import RealtimeLog
    from ics_service.types import ItemResult, ItemStatus, utcnow

    def result(i: int) -> ItemResult:
        now = utcnow()
        return ItemResult(
            execution_id="",
            item_id="",
            uri=f"request-{i}",
            status=ItemStatus.SUCCEEDED,
            threshold=0.5,
            model=ModelRef("m", "1"),
            started_at=now,
            finished_at=now,
        )

    with closing(Store(settings_of(ics_home).store_url)) as store:
        log = RealtimeLog(store, ModelRef("m", "1"))
        try:
            cancelled = sum(log.append(result(i)).cancel() for i in range(50))
            assert cancelled > 0, "every write was faster than its cancel: not effective"
            log.append(result(50)).result(timeout=30)
        finally:
            log.close()
        execution = store.find_by_name(today_execution(settings_of(ics_home)))
        assert execution is not None and execution.counts.total == 51


async def test_hostile_inputs_are_refused_cleanly(ics_home: Path, runtime: OnnxRuntime) -> None:
    settings = settings_of(ics_home, allowed_sources=[str(ics_home)])
    async with client_of(create_app(settings, runtime=runtime)) as client:
        nul = await client.post("/v1/classify", json={"uri": "a\u0000b.jpg"})
        assert nul.status_code == 400 and "NUL" in error_of(nul)["message"]
        many = {
            "inputs": [
                {"name": "INPUT", "shape": [100_000], "datatype": "BYTES", "data": [""] * 100_000}
            ]
        }
        flood = await client.post("/v2/models/efficientnet-lite0/infer", json=many)
        assert flood.status_code == 400 and "at most 256" in flood.json()["error"]
        taken = await client.post(
            "/v1/executions", json={"sources": [str(ics_home)], "name": "realtime-2099-01-01"}
        )
        assert taken.status_code == 400 and "kept for the real-time" in error_of(taken)["message"]
        assert (await client.post("/v1/classify", content=COFFEE)).status_code == 200


def test_ics_serve_that_cannot_start_says_why_and_exits_4(ics_home: Path) -> None:
    env = {"ICS_HOME": str(ics_home)}
    down = ics_process(
        "serve",
        "--port",
        str(free_port()),
        "--grpc-port",
        "0",
        "--store",
        "postgresql://ics:pw@127.0.0.1:1/ics",
        env=env,
    )
    assert down.returncode == ExitCode.ENVIRONMENT, down.stderr
    assert "cannot open the execution store postgresql://ics:***@127.0.0.1:1/ics" in down.stderr
    assert "Traceback" not in down.stderr and ":pw@" not in down.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = ics_process("serve", "--port", str(port), "--grpc-port", "0", env=env)
    assert busy.returncode == ExitCode.ENVIRONMENT, busy.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in busy.stderr
